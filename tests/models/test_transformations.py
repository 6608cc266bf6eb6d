"""Every JAX transformation through the stock `UNet`, for every preset and switch, on images and volumes.

Each transformation is checked against an independent computation of the same quantity (a
finite difference, the gradient, the untransformed call), so a layer that breaks it (a custom
derivative without forward mode, a native call without export support) fails here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quick_init
from jax import export

from resunet_jax import models

TINY = {'base_width': 4, 'depth': 2}
# The presets, and every other switch value at least once beside them (a pairwise cover).
CONFIGS = {
  'unet': models.preset('unet', **TINY),  # nearest, no norm, postact, max-pool, all skips
  'resunet': models.preset(
    'resunet',
    upsample='bilinear',
    norm='layer',
    skips='10',
    init='glorot',
    skip_kind='attention',
    deep_supervision=True,  # exported without its auxiliary heads
    **TINY,
  ),
  'attention_unet': models.preset('attention_unet', **TINY),  # attention gates on every skip
  'resunet_zhang': models.preset('resunet_zhang', skips='none', **TINY),  # batch norm, preact, stride, no skips
  'unet_plusplus': models.preset(  # nested skips, transpose, deep supervision; group norm, remat, identity, he
    'unet_plusplus',
    residual=True,
    norm='group',
    norm_groups=2,
    remat=True,
    shortcut='identity',
    init='he',
    **TINY,
  ),
}
# Each preset's configuration again as a 3D network; one pools anisotropically (depth kept at level 1).
VOLUMES = {f'{name}_3d': config.replace(spatial_dims=3) for name, config in CONFIGS.items()}
VOLUMES['resunet_zhang_3d'] = VOLUMES['resunet_zhang_3d'].replace(pool_strides=((1, 2, 2), (2, 2, 2)))
CONFIGS |= VOLUMES
IMAGES = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
VOLUME = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 3))


def _input(name):
  return VOLUME if CONFIGS[name].spatial_dims == 3 else IMAGES


@functools.cache
def _setup(name):
  """The model, its variables, a probe on the logits and a parameter direction `v`."""
  config, x = CONFIGS[name], _input(name)
  model = models.UNet(config)
  variables = quick_init.init(model, x, train=False)
  rng = np.random.default_rng(2)  # numpy draws: no generator to compile per shape
  probe = jnp.asarray(rng.standard_normal((*x.shape[:-1], config.num_classes)), jnp.float32)
  direction = jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype), variables['params'])
  return model, variables, probe, direction


def _loss(name, params):
  """A scalar of the parameters: the logits against a fixed probe."""
  model, variables, probe, _ = _setup(name)
  return jnp.sum(model.apply({**variables, 'params': params}, _input(name), train=False) * probe)


def _dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@functools.cache
def _grad(name):
  return jax.jit(jax.grad(functools.partial(_loss, name)))(_setup(name)[1]['params'])


def _close(actual, expected, rtol=1e-3):
  """Equal to float32 rounding, against each array's largest entry (a broken transformation is off by O(1))."""
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))) + 1e-7)


def check_grad_and_jvp(name):
  """Reverse and forward mode agree: the jvp along `v` is the gradient's dot product with `v`."""
  _, variables, _, v = _setup(name)
  _, tangent = jax.jit(lambda p, v: jax.jvp(functools.partial(_loss, name), (p,), (v,)))(variables['params'], v)
  assert float(jnp.abs(tangent)) > 0
  _close(tangent, _dot(_grad(name), v))


def check_linearize(name):
  _, variables, _, v = _setup(name)
  _, linear = jax.linearize(functools.partial(_loss, name), variables['params'])
  _close(jax.jit(linear)(v), _dot(_grad(name), v))


def check_jacfwd_jacrev(name):
  """The input Jacobian of one image's logits, both ways; its rows are input gradients."""
  model, variables, probe, _ = _setup(name)
  x = _input(name)
  corner = (0, slice(0, 4), slice(0, 4)) if x.ndim == 4 else (0, slice(0, 2), slice(0, 2), slice(0, 4))

  def logits(x):
    return model.apply(variables, x[None], train=False)[corner].ravel()  # 16 outputs

  forward, reverse = jax.jit(jax.jacfwd(logits))(x[0]), jax.jit(jax.jacrev(logits))(x[0])
  assert forward.shape == (16, *x.shape[1:])
  _close(forward, reverse)
  _close(reverse[5], jax.grad(lambda x: logits(x)[5])(x[0]))


def check_hvp(name):
  """Forward-over-reverse Hessian-vector product equals reverse-over-reverse."""
  _, variables, _, v = _setup(name)
  params = variables['params']
  # The logits are piecewise linear in the inputs but not in the parameters (products of layers).
  loss = functools.partial(_loss, name)
  fwd_rev = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, v)
  rev_rev = jax.jit(jax.grad(lambda p: _dot(jax.grad(loss)(p), v)))(params)
  _close(fwd_rev, rev_rev)


def check_vmap_inputs(name):
  model, variables, _, _ = _setup(name)
  x = _input(name)
  per_image = jax.jit(jax.vmap(lambda x: model.apply(variables, x[None], train=False)[0]))(x)
  _close(per_image, model.apply(variables, x, train=False))


def check_vmap_params(name):
  """Two parameter sets stacked on a leading axis, applied in one vmapped call."""
  model, variables, _, v = _setup(name)
  x = _input(name)
  other = jax.tree.map(lambda p, d: p + 0.1 * d, variables['params'], v)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), variables['params'], other)
  both = jax.jit(jax.vmap(lambda p: model.apply({**variables, 'params': p}, x, train=False)))(stacked)
  _close(both[0], model.apply(variables, x, train=False))
  _close(both[1], model.apply({**variables, 'params': other}, x, train=False))


def check_remat(name):
  _, variables, _, _ = _setup(name)
  remat = jax.jit(jax.grad(jax.checkpoint(functools.partial(_loss, name))))(variables['params'])
  _close(remat, _grad(name))


def check_export(name):
  """Exported with a symbolic batch and spatial sizes, serialised, deserialised and run at two
  batch sizes and at an odd size (which the model pads inside, centred, and crops back)."""
  model, variables, _, _ = _setup(name)
  x = _input(name)
  shape = export.symbolic_shape('b, h, w' if x.ndim == 4 else 'b, d, h, w')
  exported = export.export(jax.jit(lambda v, x: model.apply(v, x, train=False)))(
    variables, jax.ShapeDtypeStruct((*shape, x.shape[-1]), x.dtype)
  )
  restored = export.deserialize(exported.serialize())
  odd = x[:1, :7, :5] if x.ndim == 4 else x[:1, :3, :7, :5]
  for images in (x[:1], x, odd):
    _close(restored.call(variables, images), model.apply(variables, images, train=False))


CHECKS = {name[6:]: check for name, check in globals().items() if name.startswith('check_')}


# The volume networks run the checks that reach every code path the spatial axes change (padding
# and cropping, the n-D upsampling, gates and pooling): reverse and forward mode, vmap over
# parameters, export with symbolic sizes. The rest are the 2D ones' (the same Flax layers).
VOLUME_CHECKS = ('grad_and_jvp', 'vmap_params', 'export')
CASES = [(c, t) for c in sorted(CONFIGS) for t in sorted(CHECKS) if c not in VOLUMES or t in VOLUME_CHECKS]


@pytest.mark.parametrize(('config', 'transformation'), CASES)
def test_transformation_goes_through_the_stock_model(config, transformation):
  CHECKS[transformation](config)


def test_the_configs_cover_every_preset_and_switch_value():
  covered = {
    field: {getattr(c, field) for c in CONFIGS.values()}
    for field in (
      'norm',
      'upsample',
      'block',
      'downsample',
      'residual',
      'remat',
      'shortcut',
      'init',
      'skip_kind',
      'deep_supervision',
    )
  }
  assert covered == {
    'norm': set(models.config.NORMS),
    'upsample': set(models.config.UPSAMPLES),
    'block': set(models.config.BLOCKS),
    'downsample': set(models.config.DOWNSAMPLES),
    'residual': {False, True},
    'remat': {False, True},
    'shortcut': set(models.config.SHORTCUTS),
    'init': set(models.config.INITS),
    'skip_kind': set(models.config.SKIP_KINDS),
    'deep_supervision': {False, True},
  }
  assert set(models.PRESETS) <= set(CONFIGS)
  assert {f'{name}_3d' for name in models.PRESETS} <= set(CONFIGS)  # every preset as a volume network
  assert {c.skips for c in CONFIGS.values()} >= {'all', 'none', '10'}
