r"""Differential fuzzing of the CPU layer set against the stock one: random shapes, every layer slot.

  python tests/cpu/fuzz_layers.py --cases=2000 --seed=0          # prints one JSON line of counts
  ONEDNN_MAX_CPU_ISA=AVX2 python tests/cpu/fuzz_layers.py        # the AVX2 kernels on an AVX-512 host

Each case draws a slot of `models.Layers` (`conv`, `conv_relu`, `upsample_conv` with and without
a skip, `conv_transpose`, `max_pool`, `upsample`), a batch of 1-4, channels and features of
1-67 (odd and prime ones included), sides of 1-67 (even where the slot halves them), a kernel of
1, 2 or 3 and a stride of 1 or 2, builds the slot from the stock set (`models.STOCK`, XLA and
Flax) and from the CPU set (`cpu.layers.LAYERS`, oneDNN) with the same parameters, and compares
the forward values, the input gradient and every parameter gradient of `sum(y * probe)` (a
random probe): all finite, within float32 tolerance of the stock values (`TOLERANCE` times the
largest stock magnitude), and the CPU program run again from `THREADS` other threads
bit-identical. tests/cpu/test_fuzz.py runs a seeded sample; the long run, under AddressSanitizer
too, is in benchmarks/README.md ("The CPU backend on AVX2").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

SLOTS = ('conv', 'conv_relu', 'upsample_conv', 'upsample_conv_skip', 'conv_transpose', 'max_pool', 'upsample')
THREADS = 2  # other threads that run each CPU program again
TOLERANCE = 2e-5  # of the largest stock magnitude: float32 sums of up to 9 * 134 products, reordered


@dataclasses.dataclass(frozen=True)
class Case:
  """One drawn layer call: `x` is `[batch, height, width, channels]`."""

  slot: str
  batch: int
  height: int
  width: int
  channels: int
  features: int
  kernel: int
  stride: int
  skip_channels: int
  seed: int


def draw(rng: np.random.Generator, seed: int) -> Case:
  """A random case (`seed` keys its arrays); sides are even where the slot pools."""
  slot = SLOTS[int(rng.integers(len(SLOTS)))]
  side = lambda: int(rng.integers(1, 9 if rng.random() < 0.3 else 68))  # noqa: E731 (tiny maps: gemm kernels)
  height, width = side(), side()
  if slot == 'max_pool':
    height, width = 2 * max(1, height // 2), 2 * max(1, width // 2)
  kernel = int(rng.choice([1, 3])) if slot.startswith('upsample_conv') else int(rng.integers(1, 4))
  stride = 1 if slot.startswith('upsample_conv') or slot == 'conv_transpose' else int(rng.integers(1, 3))
  if slot == 'conv_transpose':
    kernel, stride = 2, 2
  return Case(
    slot=slot,
    batch=int(rng.integers(1, 5)),
    height=height,
    width=width,
    channels=int(rng.integers(1, 68)),
    features=int(rng.integers(1, 68)),
    kernel=kernel,
    stride=stride,
    skip_channels=int(rng.integers(1, 68)) if slot == 'upsample_conv_skip' else 0,
    seed=seed,
  )


def _apply(case: Case, layers):
  """`(init, apply)` of the case's slot built from `layers`; apply takes `(variables, x, skip)`."""
  if case.slot in ('max_pool', 'upsample'):
    fn = getattr(layers, case.slot)
    return None, lambda variables, x, skip: fn(x)
  if case.slot == 'conv':
    module = layers.conv(case.features, (case.kernel, case.kernel), strides=(case.stride, case.stride))
  elif case.slot == 'conv_relu':
    module = layers.conv_relu(case.features, (case.kernel, case.kernel), strides=(case.stride, case.stride))
  elif case.slot == 'conv_transpose':
    module = layers.conv_transpose(case.features, (2, 2), strides=(2, 2))
  else:
    module = layers.upsample_conv(case.features, (case.kernel, case.kernel), relu=bool(case.seed % 2))
  if case.slot.startswith('upsample_conv'):
    return module.init, lambda variables, x, skip: module.apply(variables, x, skip)
  return module.init, lambda variables, x, skip: module.apply(variables, x)


def check(case: Case) -> dict:
  """Compares the case on both layer sets; returns `{'ok': bool, 'why': str, 'error': float}`."""
  from resunet_jax import models
  from resunet_jax.cpu import layers as cpu_layers

  keys = jax.random.split(jax.random.key(case.seed), 4)
  x = jax.random.normal(keys[0], (case.batch, case.height, case.width, case.channels))
  skip = None
  if case.skip_channels:
    skip = jax.random.normal(keys[1], (case.batch, 2 * case.height, 2 * case.width, case.skip_channels))
  init, stock_apply = _apply(case, models.STOCK)
  _, cpu_apply = _apply(case, cpu_layers.layers())
  variables = {} if init is None else (init(keys[2], x, skip) if skip is not None else init(keys[2], x))

  def program(apply):  # one compiled program per set: the outputs and the gradients of sum(y * probe)
    def step(variables, x, probe):
      y, vjp = jax.vjp(lambda variables, x: apply(variables, x, skip), variables, x)
      return y, vjp(probe)

    compiled = jax.jit(step)
    return lambda probe: [np.asarray(a) for a in jax.tree.leaves(compiled(variables, x, probe))]

  stock_step, cpu_step = program(stock_apply), program(cpu_apply)
  zero = jnp.zeros(jax.eval_shape(lambda v, x: stock_apply(v, x, skip), variables, x).shape)
  y_stock, y_cpu = stock_step(zero)[0], cpu_step(zero)[0]  # oneDNN's primitives are made here, on this thread
  # A ReLU's kink: where exactly one set's output is 0, the rounding of a pre-activation near 0
  # put the two on different sides, and the gradients differ there by the probe itself. Those
  # pixels carry no probe (a wrong mask elsewhere still shows, and so do the forward values).
  agree = (y_stock == 0) == (y_cpu == 0)
  probe = jax.random.normal(keys[3], y_stock.shape) * agree
  stock, cpu = stock_step(probe), cpu_step(probe)
  # XLA runs a call on whichever of its threads is free: the same program from other threads
  # must give the same bits (a scratchpad owned by the creating thread crashed or corrupted them).
  with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
    others = list(pool.map(lambda _: cpu_step(probe), range(THREADS)))
  if any(not all(np.array_equal(a, b) for a, b in zip(cpu, other, strict=True)) for other in others):
    return {'ok': False, 'why': 'another thread gave other values', 'error': float('inf')}
  worst = 0.0
  for s, c in zip(stock, cpu, strict=True):
    if s.shape != c.shape:
      return {'ok': False, 'why': f'shape {c.shape} != {s.shape}', 'error': float('inf')}
    if not np.isfinite(c).all():
      return {'ok': False, 'why': 'non-finite', 'error': float('inf')}
    scale = max(float(np.abs(s).max(initial=0.0)), 1e-6)
    worst = max(worst, float(np.abs(s - c).max(initial=0.0)) / scale)
  return {'ok': worst <= TOLERANCE, 'why': '' if worst <= TOLERANCE else 'values differ', 'error': worst}


def run(cases: int, seed: int, progress: bool = False) -> dict:
  """`cases` seeded draws from `seed`; returns the counts and the failing cases."""
  rng = np.random.default_rng(seed)
  counts = {slot: 0 for slot in SLOTS}
  failures = []
  worst = 0.0
  for index in range(cases):
    case = draw(rng, seed * 1_000_003 + index)
    result = check(case)
    counts[case.slot] += 1
    worst = max(worst, result['error'] if result['ok'] else 0.0)
    if not result['ok']:
      failures.append({**dataclasses.asdict(case), **result})
    if progress and (index + 1) % 50 == 0:
      print(f'{index + 1}/{cases} cases, {len(failures)} failed', file=sys.stderr, flush=True)
    if (index + 1) % 200 == 0:
      jax.clear_caches()  # bounded memory over thousands of programs
  return {
    'cases': cases,
    'failed': len(failures),
    'worst_relative_error': worst,
    'per_slot': counts,
    'failures': failures[:20],
    'isa': os.environ.get('ONEDNN_MAX_CPU_ISA', 'native'),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cases', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  summary = run(args.cases, args.seed, progress=True)
  print(json.dumps(summary))
  sys.exit(1 if summary['failed'] else 0)


if __name__ == '__main__':
  main()
