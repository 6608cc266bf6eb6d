"""The train state and the optimizer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from resunet_jax.errors import UserError


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics, an optional EMA, train-time scales and a stop mark.

  One member of a population (`training.population`); a population stacks K of them on a
  leading axis, a single run being a population of one.

  Attributes:
    batch_stats: the `batch_stats` collection ({} without BatchNorm).
    ema_params: exponential moving average of `params` ({} when EMA is off).
    scales: apply-time scale inputs of `UNet` this member trains and evaluates with, e.g.
      `{'residual_scale': [2 * depth + 1]}` ({}: none, every path at 1).
    stopped_at: int32 scalar, 0 while training; else the step whose loss or gradient was not
      finite, after which the member's state stays as it was (`steps.guarded_train_step`).
    ema_decay: EMA decay (0 disables it); static.
  """

  batch_stats: Any = None
  ema_params: Any = None
  scales: Any = None
  stopped_at: Any = None
  ema_decay: float = train_state.struct.field(pytree_node=False, default=0.0)

  @property
  def eval_params(self):
    """The parameters to evaluate: the EMA when enabled."""
    return self.ema_params if self.ema_decay else self.params

  def variables(self, params=None) -> dict:
    """`{'params': ..., 'batch_stats': ...}` for `apply_fn`."""
    variables = {'params': self.params if params is None else params}
    if self.batch_stats:
      variables['batch_stats'] = self.batch_stats
    return variables


OPTIMIZERS = ('adamw', 'sgd')
HYPERPARAMETERS = ('learning_rate', 'weight_decay')  # per member: in the optimizer state


def make_schedule(config: Any, peak=None) -> optax.Schedule:
  """Linear warmup from 0 to the peak rate over `warmup_steps`, then cosine decay to
  `peak * final_lr_fraction` at `num_steps` (the `config.train` section).

  Args:
    config: the `config.train` section.
    peak: the peak rate (a traced scalar for a population member); default `learning_rate`.
  """
  peak = config.learning_rate if peak is None else peak
  shape = optax.warmup_cosine_decay_schedule(  # the shape at peak 1: optax branches on the peak's value
    init_value=0.0,
    peak_value=1.0,
    warmup_steps=config.warmup_steps,
    decay_steps=max(config.num_steps, config.warmup_steps + 1),
    end_value=config.final_lr_fraction,
  )
  return lambda count: peak * shape(count)


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW or SGD with linear warmup + cosine decay, and optional global-norm clipping.

  The peak `learning_rate` and the `weight_decay` are injected hyperparameters
  (`optax.inject_hyperparams`): they live in the optimizer state, so the members of a
  population share this one transformation and each trains with its own values
  (`set_hyperparameters`).

  Args:
    config: the `config.train` section: `optimizer` ('adamw' | 'sgd'), `learning_rate`,
      `warmup_steps`, `num_steps`, `final_lr_fraction`, `weight_decay`, `momentum` (SGD),
      `grad_clip` (0 disables).
  """
  if config.optimizer not in OPTIMIZERS:
    raise UserError(f"train.optimizer='{config.optimizer}' is not one of {', '.join(OPTIMIZERS)}")

  def optimizer(learning_rate, weight_decay):
    schedule = make_schedule(config, peak=learning_rate)
    if config.optimizer == 'adamw':
      chain = optax.adamw(schedule, weight_decay=weight_decay)
    else:
      chain = optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=config.momentum, nesterov=True)
      )
    if config.grad_clip:
      chain = optax.chain(optax.clip_by_global_norm(config.grad_clip), chain)
    return chain

  return optax.inject_hyperparams(optimizer)(learning_rate=config.learning_rate, weight_decay=config.weight_decay)


def set_hyperparameters(state: TrainState, **values) -> TrainState:
  """`state` with the injected optimizer hyperparameters (`HYPERPARAMETERS`) set to `values`."""
  hyperparams = dict(state.opt_state.hyperparams)
  for name, value in values.items():
    hyperparams[name] = jnp.asarray(value, hyperparams[name].dtype)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def create_train_state(
  model, optimizer, input_shape, *, seed, ema_decay: float = 0.0, scales: dict | None = None
) -> TrainState:
  """Initialises a state for `model` on inputs of `input_shape` `(B, H, W, C)`.

  Pure (`seed` may be traced): wrap it in `jax.jit` with `out_shardings` (or `jax.eval_shape`)
  to create it sharded, in `jax.vmap` over seeds to create a population.

  Args:
    scales: the member's train-time `UNet` scale inputs (`TrainState.scales`).
  """
  variables = model.init(jax.random.key(seed), jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables['params']
  return TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optimizer,
    batch_stats=variables.get('batch_stats', {}),
    ema_params=jax.tree.map(jnp.copy, params) if ema_decay else {},
    scales=dict(scales or {}),
    stopped_at=jnp.zeros((), jnp.int32),
    ema_decay=ema_decay,
  )
