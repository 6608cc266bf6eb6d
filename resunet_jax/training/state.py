"""The train state and the optimizer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from resunet_jax.errors import UserError


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and an optional EMA of the parameters.

  Attributes:
    batch_stats: the `batch_stats` collection ({} without BatchNorm).
    ema_params: exponential moving average of `params` ({} when EMA is off).
    ema_decay: EMA decay (0 disables it); static.
  """

  batch_stats: Any = None
  ema_params: Any = None
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


def make_schedule(config: Any) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
  `learning_rate * final_lr_fraction` at `num_steps` (the `config.train` section)."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=config.warmup_steps,
    decay_steps=max(config.num_steps, config.warmup_steps + 1),
    end_value=config.learning_rate * config.final_lr_fraction,
  )


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW or SGD with linear warmup + cosine decay, and optional global-norm clipping.

  Args:
    config: the `config.train` section: `optimizer` ('adamw' | 'sgd'), `learning_rate`,
      `warmup_steps`, `num_steps`, `final_lr_fraction`, `weight_decay`, `momentum` (SGD),
      `grad_clip` (0 disables).
  """
  schedule = make_schedule(config)
  if config.optimizer == 'adamw':
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
  elif config.optimizer == 'sgd':
    optimizer = optax.chain(
      optax.add_decayed_weights(config.weight_decay), optax.sgd(schedule, momentum=config.momentum, nesterov=True)
    )
  else:
    raise UserError(f"train.optimizer='{config.optimizer}' is not one of adamw, sgd")
  if config.grad_clip:
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip), optimizer)
  return optimizer


def create_train_state(model, optimizer, input_shape, *, seed: int, ema_decay: float = 0.0) -> TrainState:
  """Initialises a state for `model` on inputs of `input_shape` `(B, H, W, C)`.

  Pure: wrap it in `jax.jit` with `out_shardings` (or `jax.eval_shape`) to create it sharded.
  """
  variables = model.init(jax.random.key(seed), jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables['params']
  return TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optimizer,
    batch_stats=variables.get('batch_stats', {}),
    ema_params=jax.tree.map(jnp.copy, params) if ema_decay else {},
    ema_decay=ema_decay,
  )
