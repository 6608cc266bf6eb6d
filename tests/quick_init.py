"""`init(module, *args, **kwargs)`: a linen module's variables, compiled with the CPU's LLVM optimiser off.

On XLA's CPU backend, compiling the threefry generator behind each parameter's initialiser costs
about 0.8 s per distinct shape at the default optimisation level and 0.15 s without it: most of a
tiny model's eager `init`. Without the optimiser some float results of the truncated-normal
initialisers change in the last bit, so this is for tests that need some initial weights, never
for one that compares them with a training run's (which initialises as the library does).
"""

import jax

NO_BACKEND_OPTIMISATION = {'xla_backend_optimization_level': 0}


def init(module, *args, key=None, **kwargs):
  """`module.init(key, *args, **kwargs)` as one program compiled without backend optimisation
  (traced as it is under a transformation such as `jax.eval_shape`)."""
  key = jax.random.key(0) if key is None else key
  if any(isinstance(a, jax.core.Tracer) for a in (key, *args)):
    return module.init(key, *args, **kwargs)
  build = jax.jit(lambda key, *args: module.init(key, *args, **kwargs))
  return build.lower(key, *args).compile(compiler_options=NO_BACKEND_OPTIMISATION)(key, *args)
