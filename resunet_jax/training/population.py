"""Populations: K runs of one architecture trained as one, a single run being a population of one.

The members share the network's structure (one parameter tree shape) and differ in what leaves
it unchanged: the seed (initialisation, data order, augmentation), the optimizer's peak
learning rate and weight decay (injected hyperparameters, `state.make_optimizer`) and the
train-time `residual_scale`. Their train states are stacked on a leading member axis; each
member's numbers are those of its run alone (`member_config`, trained by `experiments/train.py`),
to float32 rounding. `jax.vmap` over the member axis trains them in one program; on XLA's CPU
backend one compiled single-member step is called once per member instead
(`runtime.member_map`). Members whose parameter trees differ (another `skips`, `depth`,
`base_width`) are separate programs: see `stand_in_reason`.

The `config.population` section (`section()`) crosses seeds x learning rates x weight decays x
residual scales, in that order (member 0 is the first of each).
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resunet_jax import configs, data, losses, models, runtime
from resunet_jax.errors import UserError
from resunet_jax.training import checkpoint, parallel
from resunet_jax.training import state as state_lib


@dataclasses.dataclass(frozen=True)
class Member:
  """One member of a population.

  Attributes:
    index: position on the member axis.
    seed: initialisation, data order and augmentation seed.
    learning_rate: peak learning rate.
    weight_decay: weight decay.
    residual_scale: multiplier on every block's shortcut, or None (no scale input: 1).
  """

  index: int
  seed: int
  learning_rate: float
  weight_decay: float
  residual_scale: float | None = None

  @property
  def label(self) -> str:
    """E.g. 'seed 3, lr 0.003, wd 0.0001, residual_scale 0'."""
    text = f'seed {self.seed}, lr {self.learning_rate:g}, wd {self.weight_decay:g}'
    return text if self.residual_scale is None else f'{text}, residual_scale {self.residual_scale:g}'

  @property
  def best_metric(self) -> str:
    """The checkpoint metric that ranks this member's best checkpoint."""
    return f'dice_{self.index}'


def _values(config, name: str, default: float) -> tuple[float, ...]:
  values = config.population[name]
  values = (values,) if isinstance(values, numbers.Number) else tuple(values)
  if not all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in values):
    raise UserError(f'population.{name}={values!r} must be numbers, e.g. --config.population.{name}="(1e-3, 3e-3)"')
  return tuple(float(v) for v in values) or (default,)


def members(config, model_config: models.ModelConfig) -> list[Member]:
  """The members of `config`'s population, crossed (seeds, rates, decays, scales).

  Raises:
    UserError: fewer than one seed, a value that is not a number, a negative rate, or residual
      scales for a model without residual shortcuts.
  """
  seeds = config.population.seeds
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise UserError(f'population.seeds={seeds!r} must be a whole number of at least 1 (members config.seed, ...)')
  rates = _values(config, 'learning_rates', config.train.learning_rate)
  decays = _values(config, 'weight_decays', config.train.weight_decay)
  if min(rates) <= 0 or min(decays) < 0:
    raise UserError(f'population rates {rates} must be positive and weight decays {decays} non-negative')
  scales = config.population.residual_scales
  scales = _values(config, 'residual_scales', 1.0) if len(tuple(scales)) else (None,)
  if scales != (None,) and not model_config.residual:
    raise UserError(
      'population.residual_scales needs a model with residual shortcuts (model.residual=True); '
      'to train the plain model beside residual ones, give the residual model a scale of 0'
    )
  crossed = itertools.product(range(config.seed, config.seed + seeds), rates, decays, scales)
  return [Member(index, *values) for index, values in enumerate(crossed)]


def member_config(config, member: Member) -> ml_collections.ConfigDict:
  """The config of `member`'s run alone (`experiments/train.py` trains it to the same numbers)."""
  alone = config.copy_and_resolve_references()
  alone.seed = member.seed
  alone.train.learning_rate = member.learning_rate
  alone.train.weight_decay = member.weight_decay
  alone.population = configs.population_section()
  if member.residual_scale is not None:
    alone.population.residual_scales = (member.residual_scale,)
  return alone


def stand_in_reason(population_model: models.ModelConfig, arm_model: models.ModelConfig) -> str | None:
  """Why a member of a `population_model` population cannot stand in for a run of `arm_model`.

  A residual model whose shortcuts are scaled by 0 is the plain model exactly: the same
  parameters under the same names (so the same initialisation for a seed), the same outputs, and
  zero gradients for its unused projections, which leave the global norm, Adam and clipping
  unchanged. A zeroed skip is not a removed skip: the decoder block keeps its larger fan-in, so
  its initial weights differ from the network built without the skip.

  Returns:
    None when a member (with `residual_scale` 0 where `arm_model` is plain) trains exactly
    `arm_model`'s run; else a one-line reason.
  """
  population_fields = population_model.to_dict()
  arm_fields = arm_model.to_dict()
  if population_model.shortcut == 'identity' and not arm_model.residual:
    return (
      "identity shortcuts scaled by 0 keep each block's input projection conv_in, so the member is not "
      'the plain network'
    )
  ignored = ('residual',) if arm_model.residual else ('residual', 'shortcut')  # a plain arm has no shortcut
  differing = sorted(k for k in arm_fields if k not in ignored and arm_fields[k] != population_fields[k])
  if 'skips' in differing:
    return (
      f'skips {arm_fields["skips"]!r} differ from {population_fields["skips"]!r}: a zeroed skip keeps the '
      "decoder's larger fan-in at initialisation, so it is not the network built without it"
    )
  if differing:
    return f"{', '.join(differing)} differ: a member trains the population's network, not this one"
  if arm_model.residual and not population_model.residual:
    return 'a plain population has no shortcuts to train a residual arm with'
  return None


def member_dir(workdir: pathlib.Path, member: Member, count: int) -> pathlib.Path:
  """Where `member`'s metrics, TensorBoard events and figures go: the workdir itself for a
  population of one, else `workdir/members/<index>`."""
  return pathlib.Path(workdir) if count == 1 else pathlib.Path(workdir) / 'members' / str(member.index)


def _init_arrays(members_: list[Member]) -> tuple:
  scales = None if members_[0].residual_scale is None else np.asarray([m.residual_scale for m in members_], np.float32)
  return (
    np.asarray([m.seed for m in members_], np.int32),
    np.asarray([m.learning_rate for m in members_], np.float32),
    np.asarray([m.weight_decay for m in members_], np.float32),
    scales,
  )


def init_fn(config, model: models.UNet, input_shape: tuple[int, ...], members_: list[Member]):
  """`(fn, args)`: `fn(*args)` is the population's freshly initialised stacked train state.

  Pure; `jax.jit(fn, out_shardings=...)(*args)` creates it sharded, `jax.eval_shape` describes it.
  """
  optimizer = state_lib.make_optimizer(config.train)
  blocks = len(models.block_names(model.config))

  def one(seed, learning_rate, weight_decay, residual_scale):
    scales = {} if residual_scale is None else {'residual_scale': jnp.full((blocks,), residual_scale, jnp.float32)}
    member = state_lib.create_train_state(
      model, optimizer, input_shape, seed=seed, ema_decay=config.train.ema_decay, scales=scales
    )
    return state_lib.set_hyperparameters(member, learning_rate=learning_rate, weight_decay=weight_decay)

  return jax.vmap(one), _init_arrays(members_)


def member_state(stacked: Any, index: int) -> state_lib.TrainState:
  """Member `index` of a stacked state, as its own train state."""
  return jax.tree.map(lambda leaf: leaf[index], stacked)


class Population:
  """The members' train states on a mesh and the compiled steps that map over them.

  In 'vmap' mode the state is one stacked pytree and a step is one program; in 'loop' mode it
  is K member states and a step calls the one compiled single-member program K times
  (`runtime.member_map`). Either way `stacked()` is the checkpointed form, leading axis K.

  Args:
    config: the experiment config.
    model: the `UNet`.
    input_shape: `(1, H, W, C)` of the initialisation input.
    members_: the members (`members`).
    mesh: the device mesh (`parallel.make_mesh`).
  """

  def __init__(self, config, model: models.UNet, input_shape, members_: list[Member], mesh):
    self.members = members_
    self.mesh = mesh
    self.mode = runtime.member_map(config.runtime.members, len(members_))
    if self.mode == 'loop' and mesh.shape[parallel.MEMBERS] > 1:
      raise UserError(
        f'parallel.member_shards={mesh.shape[parallel.MEMBERS]} needs runtime.members=vmap: '
        'looped members run on every device'
      )
    self.sharding = parallel.member_sharding(mesh) if self.mode == 'vmap' else parallel.replicated(mesh)
    weights = losses.LossWeights.from_config(config.train)
    self.train_fn, self.eval_fn = parallel.compile_steps(
      config.parallel.strategy, mesh, weights, stacked=self.mode == 'vmap'
    )
    count, replicated = len(members_), parallel.replicated(mesh)
    self._unstack = jax.jit(lambda s: tuple(member_state(s, i) for i in range(count)), out_shardings=replicated)
    self._stack = jax.jit(
      lambda states: jax.tree.map(lambda *leaves: jnp.stack(leaves), *states), out_shardings=self.sharding
    )
    init, args = init_fn(config, model, input_shape, members_)
    self._abstract = jax.eval_shape(init, *args)
    self._set(parallel.create_sharded(init, mesh, self.sharding, *args))
    self.stopped: set[int] = set()  # members known to have stopped (their steps are skipped in 'loop' mode)
    self._last: list = [None] * count

  def _set(self, stacked) -> None:
    if self.mode == 'vmap':
      self.state = stacked
    else:
      self.states = list(self._unstack(stacked))

  def abstract(self) -> Any:
    """The stacked state as `ShapeDtypeStruct`s with this population's sharding (a restore target)."""
    return checkpoint.abstract_like(self._abstract, self.sharding)

  def restore(self, stacked) -> None:
    """Replaces the state with a restored stacked one."""
    self._set(stacked)
    self.stopped = {i for i, at in enumerate(self.stopped_at()) if at}

  def stacked(self) -> Any:
    """The stacked state (leading axis = members)."""
    return self.state if self.mode == 'vmap' else self._stack(tuple(self.states))

  def member_states(self) -> list[state_lib.TrainState]:
    """Each member's train state, replicated on the mesh."""
    return list(self._unstack(self.state)) if self.mode == 'vmap' else list(self.states)

  @property
  def step(self) -> int:
    """The population's step (a looped member that stopped is no longer stepped: the largest)."""
    if self.mode == 'vmap':
      return int(np.max(jax.device_get(self.state.step)))
    return max(int(s.step) for s in self.states)

  def train(self, host_batches: list[dict], batch_size: int) -> None:
    """One step of every member; `host_batches[i]` is member i's process-local batch.

    Members sharing a seed share one batch object: it is placed on the devices once.
    """
    if self.mode == 'vmap':
      local = {key: np.stack([b[key] for b in host_batches]) for key in data.BATCH_KEYS if key in host_batches[0]}
      sharding = parallel.member_batch_sharding(self.mesh)
      batch = {
        key: jax.make_array_from_process_local_data(sharding, value, (value.shape[0], batch_size, *value.shape[2:]))
        for key, value in local.items()
      }
      self.state, self._last = self.train_fn(self.state, batch)
      return
    placed: dict[int, dict] = {}
    sharding = parallel.batch_sharding(self.mesh)
    for index, host in enumerate(host_batches):
      if index in self.stopped:
        continue
      if id(host) not in placed:
        placed[id(host)] = data.to_global(host, sharding)
      self.states[index], self._last[index] = self.train_fn(self.states[index], placed[id(host)])

  def last_metrics(self) -> dict[str, np.ndarray]:
    """The last step's metrics, name -> `[K]` (NaN for a member whose step was skipped)."""
    if self.mode == 'vmap':
      return {name: np.asarray(value) for name, value in jax.device_get(self._last).items()}
    fetched = jax.device_get(self._last)
    names = next(m for m in fetched if m is not None).keys()
    return {name: np.asarray([np.nan if m is None else m[name] for m in fetched], np.float32) for name in names}

  def stopped_at(self) -> np.ndarray:
    """`[K]` int: 0 for a training member, else the step at which it stopped."""
    if self.mode == 'vmap':
      return np.asarray(jax.device_get(self.state.stopped_at))
    return np.asarray(jax.device_get([s.stopped_at for s in self.states]))  # one transfer
