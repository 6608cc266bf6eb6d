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

The mesh has a second axis, `('members', 'data')`: a population's member axis
(`training.population`) may be split over devices when its members are vmapped; it has size 1
otherwise, and every sharding above leaves it replicated.
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
MEMBERS = 'members'
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


def make_mesh(devices=None, *, member_shards: int = 1) -> jax.sharding.Mesh:
  """A `('members', 'data')` mesh over all devices, with Auto axis types (plain slicing works).

  Args:
    devices: default all.
    member_shards: size of the `members` axis (`parallel.member_shards`); the rest is `data`.

  Raises:
    UserError: the devices do not split into `member_shards` equal groups.
  """
  devices = jax.devices() if devices is None else devices
  if member_shards < 1 or len(devices) % member_shards:
    raise UserError(
      f'parallel.member_shards={member_shards} must be a positive divisor of the device count ({len(devices)})'
    )
  shape = (member_shards, len(devices) // member_shards)
  return jax.make_mesh(shape, (MEMBERS, AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, P(AXIS))


def member_sharding(mesh) -> NamedSharding:
  """A population's stacked state or metrics: the leading (member) axis split over `members`."""
  return NamedSharding(mesh, P(MEMBERS))


def member_batch_sharding(mesh) -> NamedSharding:
  """A population's stacked batch `[K, B, ...]`: members over `members`, the batch over `data`."""
  return NamedSharding(mesh, P(MEMBERS, AXIS))


def create_sharded(init_fn, mesh, sharding=None, *args):
  """Runs `init_fn(*args)` under jit straight into buffers placed with `sharding` (default replicated)."""
  return jax.jit(init_fn, out_shardings=replicated(mesh) if sharding is None else sharding)(*args)


def check_batch_size(global_batch: int, mesh) -> None:
  """The global batch must split evenly over the data devices and the processes."""
  devices, processes = mesh.shape[AXIS], jax.process_count()
  if global_batch < 1 or global_batch % devices or global_batch % processes:
    raise UserError(
      f'train.batch_size={global_batch} must be a positive multiple of the device count ({devices}) '
      f'and process count ({processes})'
    )


def compile_steps(strategy: str, mesh, loss_weights: losses.LossWeights, *, stacked: bool = False):
  """The compiled `(train_step, eval_step)` for `strategy` on `mesh`.

  The train step is `steps.guarded_train_step` and donates the state. It takes `(state, batch)`
  with a replicated member state and a `batch_sharding` batch; with `stacked`, a population's
  stacked state (`member_sharding`) and batch `[K, B, ...]` (`member_batch_sharding`), every
  member in one vmapped program, returning metrics `[K]`. The eval step always takes one
  member's (replicated) state.
  """
  step = functools.partial(steps.guarded_train_step, loss_weights=loss_weights)
  if stacked:
    state_spec, data_spec, out_spec = P(MEMBERS), P(MEMBERS, AXIS), P(MEMBERS)
  else:
    state_spec, data_spec, out_spec = P(), P(AXIS), P()
  if strategy == 'jit':
    sharded = functools.partial(NamedSharding, mesh)
    train = jax.jit(
      jax.vmap(step) if stacked else step,
      in_shardings=(sharded(state_spec), sharded(data_spec)),
      out_shardings=(sharded(out_spec), sharded(out_spec)),
      donate_argnums=0,
    )
  elif strategy == 'pmap':
    per_device = functools.partial(step, axis_name=AXIS)
    per_device = jax.shard_map(
      jax.vmap(per_device) if stacked else per_device,
      mesh=mesh,
      in_specs=(state_spec, data_spec),
      out_specs=(out_spec, out_spec),
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
