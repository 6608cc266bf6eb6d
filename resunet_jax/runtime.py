"""Where a run executes: the `config.runtime` section and the layer set (backend) it picks.

The backend is chosen once per run, never by the model: `layers(config.runtime.backend)` gives
the `models.Layers` that `UNet(..., layers=...)` is built from.

- 'stock': `models.STOCK`, Flax's and lax's layers: every platform, every JAX transformation.
- 'cpu': `resunet_jax.cpu.layers`: oneDNN convolutions for XLA's CPU backend, reverse mode
  only (benchmarks/README.md has the figures). Needs the `cpu` extra.
- 'auto' (default): 'cpu' where JAX runs on one CPU device with AVX-512 and the CPU backend
  loads, else 'stock' (a custom call is not partitioned over a sharded batch, GPUs and TPUs
  have their own kernels, and the AVX2 kernels are not yet shown safe: benchmarks/README.md;
  'cpu' still forces them).

Both sets have the same parameter trees and values (to float32 rounding), so a checkpoint
written with one restores and trains on with the other; the backend is not part of a run's
identity (`configs.PLACEMENT_KEYS`).
"""

from __future__ import annotations

import functools
import logging

import jax
import ml_collections

from resunet_jax import models
from resunet_jax.errors import UserError

BACKENDS = ('auto', 'stock', 'cpu')
MEMBER_MAPS = ('auto', 'vmap', 'loop')


def section() -> ml_collections.ConfigDict:
  """The `config.runtime` section with its defaults."""
  c = ml_collections.ConfigDict()
  c.backend = 'auto'  # auto | stock | cpu (see resunet_jax.runtime)
  c.members = 'auto'  # auto | vmap | loop: how a population's step maps over members (member_map)
  return c


@functools.cache
def _cpu_layers() -> models.Layers | None:
  """The CPU layer set, or None where it cannot load here (logged once, with the reason)."""
  from resunet_jax.cpu import layers as cpu_layers
  from resunet_jax.cpu import onednn

  try:
    return cpu_layers.layers()
  except onednn.OneDNNUnavailable as e:
    # Without the wheels (the extra not installed, not Linux x86-64) stock is the expected path; a failed build is not.
    level = logging.INFO if isinstance(e, onednn.OneDNNNotInstalled) else logging.WARNING
    logging.log(level, 'Using the stock layers (slower on CPU): %s', e)
    return None


def cpu_backend_available() -> bool:
  """Whether the CPU layer set can run here: JAX on the CPU and the CPU backend loaded (logged once if not)."""
  return jax.default_backend() == 'cpu' and _cpu_layers() is not None


def _has_avx512() -> bool:
  """Whether the CPU has AVX-512 (the instruction set the CPU backend was measured and validated on)."""
  try:
    with open('/proc/cpuinfo') as f:
      return ' avx512f' in f.read()
  except OSError:
    return False


def auto_backend() -> str:
  """What 'auto' picks here: 'cpu' on one CPU device with AVX-512 where the CPU backend loads, else 'stock'."""
  if jax.device_count() == 1 and _has_avx512() and cpu_backend_available():
    return 'cpu'
  return 'stock'


def layers(backend: str, model: models.ModelConfig | None = None) -> models.Layers:
  """The layer set for a `runtime.backend` value ('auto' | 'stock' | 'cpu') and the network `model`.

  The CPU backend's layers are 2D with stride 2 (`ModelConfig.planar`): for a volume or other
  pooling strides 'auto' takes the stock set.

  Raises:
    UserError: an unknown name, 'cpu' where the CPU backend cannot load (the reason, in one
      line), or 'cpu' for a network that is not planar.
  """
  if backend == 'stock':
    return models.STOCK
  if model is not None and not model.planar and backend in ('auto', 'cpu'):
    if backend == 'cpu':
      raise UserError(
        f'runtime.backend=cpu has 2D layers of stride 2 only; this network has spatial_dims={model.spatial_dims} '
        f'and pool_strides={model.strides}: use runtime.backend=stock or auto'
      )
    return models.STOCK
  if backend == 'cpu':
    from resunet_jax.cpu import layers as cpu_layers

    return cpu_layers.layers()  # OneDNNUnavailable is a UserError: one line saying why
  if backend == 'auto':
    return _cpu_layers() if auto_backend() == 'cpu' else models.STOCK
  raise UserError(f"runtime.backend='{backend}' is not a backend; valid: {', '.join(BACKENDS)}")


def member_map(name: str, members: int) -> str:
  """How a population's training step maps over its `members` (a `runtime.members` value).

  - 'vmap': one program over every member (`jax.vmap` over the leading member axis); what
    accelerators are for, and the only way to split members over devices.
  - 'loop': one compiled single-member program, called once per member each step. On XLA's CPU
    backend a vmapped convolution with per-member kernels becomes a slow grouped convolution;
    the loop compiles once and is the fastest there (benchmarks/README.md, "Populations").
  - 'auto': 'loop' on the CPU or for a single member, else 'vmap'.

  Both give every member the results of its run alone, to float32 rounding (bit-identical with
  'loop'); the choice is not part of a run's identity, so a run resumes with either.

  Raises:
    UserError: an unknown name.
  """
  if name not in MEMBER_MAPS:
    raise UserError(f"runtime.members='{name}' is not one of {', '.join(MEMBER_MAPS)}")
  if name == 'auto':
    return 'loop' if members == 1 or jax.default_backend() == 'cpu' else 'vmap'
  return name
