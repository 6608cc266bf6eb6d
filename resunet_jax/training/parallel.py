"""Devices: multi-host start-up, the mesh, shardings and the two step strategies.

- 'jit': one program over a `('data',)` mesh; the batch is sharded along it, the state
  replicated (created already sharded), its buffers donated. XLA inserts the gradient
  all-reduce; BatchNorm statistics over the sharded global batch are already global.
- 'pmap': the per-device program style of `jax.pmap`, written with `jax.shard_map` over the
  same mesh: each device runs `train_step` on its slice, with an explicit `pmean` of the
  gradients, metrics and BatchNorm statistics (the model's `axis_name`). shard_map rather than
  pmap because pmap is now implemented on top of jit and shard_map anyway, and shard_map keeps
  the state a replicated global `jax.Array` on the same mesh, so checkpoints, restore and
  evaluation are shared with 'jit' unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resunet_jax import losses
from resunet_jax.errors import UserError
from resunet_jax.training import steps

AXIS = 'data'
STRATEGIES = ('jit', 'pmap')


def initialize_distributed(config: Any) -> None:
  """`jax.distributed.initialize` from the `config.parallel` section, when asked for.

  `coordinator_address` set: explicit GPU-cluster / local multi-process start-up with
  `num_processes` and `process_id`. `distributed='auto'`: arguments from the environment
  (Cloud TPU pods, SLURM). Otherwise single process.
  """
  if config.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=config.coordinator_address,
      num_processes=config.num_processes,
      process_id=config.process_id,
      heartbeat_timeout_seconds=config.heartbeat_timeout_s,
    )
  elif config.distributed == 'auto':
    jax.distributed.initialize(heartbeat_timeout_seconds=config.heartbeat_timeout_s)
  elif config.distributed != 'none':
    raise UserError(f"parallel.distributed='{config.distributed}' is not one of none, auto")


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D `('data',)` mesh over all devices, with Auto axis types (plain slicing works)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, P(AXIS))


def create_sharded(init_fn, mesh):
  """Runs `init_fn()` under jit straight into replicated buffers on `mesh`."""
  return jax.jit(init_fn, out_shardings=replicated(mesh))()


def check_batch_size(global_batch: int, mesh) -> None:
  """The global batch must split evenly over devices and processes."""
  devices, processes = mesh.devices.size, jax.process_count()
  if global_batch < 1 or global_batch % devices or global_batch % processes:
    raise UserError(
      f'train.batch_size={global_batch} must be a positive multiple of the device count ({devices}) '
      f'and process count ({processes})'
    )


def compile_steps(strategy: str, mesh, loss_weights: losses.LossWeights):
  """The compiled `(train_step, eval_step)` for `strategy` on `mesh`.

  Both take `(state, batch)` with a replicated state and a `batch_sharding` batch; the train
  step donates the state.
  """
  state_sharding, data_sharding = replicated(mesh), batch_sharding(mesh)
  if strategy == 'jit':
    train = jax.jit(
      functools.partial(steps.train_step, loss_weights=loss_weights),
      in_shardings=(state_sharding, data_sharding),
      out_shardings=(state_sharding, state_sharding),
      donate_argnums=0,
    )
  elif strategy == 'pmap':
    per_device = jax.shard_map(
      functools.partial(steps.train_step, loss_weights=loss_weights, axis_name=AXIS),
      mesh=mesh,
      in_specs=(P(), P(AXIS)),
      out_specs=(P(), P()),
    )
    train = jax.jit(per_device, donate_argnums=0)
  else:
    raise UserError(f"parallel.strategy='{strategy}' is not one of {', '.join(STRATEGIES)}")
  return train, compile_eval(steps.eval_step, mesh)


def compile_eval(eval_fn, mesh, *, extra_args: int = 0):
  """`eval_fn(state, batch, *extra)` jitted with the state and `extra` replicated, the batch and
  the outputs (leading axis = batch) split over the devices."""
  replicated_sharding = replicated(mesh)
  in_shardings = (replicated_sharding, batch_sharding(mesh)) + (replicated_sharding,) * extra_args
  return jax.jit(eval_fn, in_shardings=in_shardings, out_shardings=batch_sharding(mesh))


def model_axis_name(strategy: str) -> str | None:
  """BatchNorm's cross-device axis: needed per device ('pmap'), implicit under 'jit'."""
  return AXIS if strategy == 'pmap' else None
