"""Pure, module-level training and evaluation steps.

Neither applies jit, pmap or shardings, and neither does I/O: `parallel` wraps them. With
`axis_name`, they run per device (shard_map) and average gradients, loss and metrics over
that axis; without it, they see the global batch (jit over a mesh does the rest).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from resunet_jax import losses, metrics
from resunet_jax.training.state import TrainState


def _mean(value, axis_name):
  return value if axis_name is None else jax.lax.pmean(value, axis_name)


def train_step(
  state: TrainState, batch: dict, *, loss_weights: losses.LossWeights, axis_name: str | None = None
) -> tuple[TrainState, dict]:
  """One optimizer step.

  Args:
    state: the train state.
    batch: `image` `[B, H, W, C]` float32, `mask` `[B, H, W]` int32, `valid` `[B]` float32, and
      for patches `weight` `[B, H, W]` float32 (0 on padding: out of the loss and the metrics).
    loss_weights: loss term weights (static); a deeply supervised model's heads all count.
    axis_name: mapped device axis to average over (shard_map), or None (jit).

  Returns:
    The new state and scalar metrics: `loss`, `dice`, `iou`, `accuracy` (of the main head), `grad_norm`, and
    `grad_norm/<block>` per top-level module (the gradient flow through each block).
  """
  has_batch_stats = bool(state.batch_stats)

  def loss_fn(params):
    variables = state.variables(params)
    if has_batch_stats:
      heads, updates = state.apply_fn(
        variables, batch['image'], train=True, all_heads=True, mutable=['batch_stats'], **state.scales
      )
    else:
      heads, updates = state.apply_fn(variables, batch['image'], train=True, all_heads=True, **state.scales), {}
    loss = losses.segmentation_loss(heads, batch['mask'], batch['valid'], loss_weights, batch.get('weight'))
    return loss, (heads[0], updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = _mean(grads, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', state.batch_stats))
  if state.ema_decay:
    decay = state.ema_decay
    state = state.replace(
      ema_params=jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, state.params)
    )
  counts = metrics.confusion(metrics.predict(logits), batch['mask'], logits.shape[-1], batch.get('weight'))
  step_metrics = {'loss': loss, **metrics.scores(counts, batch['valid'])}
  step_metrics = {name: _mean(value, axis_name) for name, value in step_metrics.items()}
  step_metrics['grad_norm'] = optax.tree.norm(grads)
  step_metrics.update({f'grad_norm/{name}': optax.tree.norm(g) for name, g in grads.items()})
  return state, step_metrics


def guarded_train_step(
  state: TrainState, batch: dict, *, loss_weights: losses.LossWeights, axis_name: str | None = None
) -> tuple[TrainState, dict]:
  """`train_step`, except that a member whose loss or gradient is not finite stops.

  Its parameters, optimizer state, statistics and EMA stay as they were before that step, and
  `stopped_at` records the step (1-based), from then on; only `step` still counts. So one
  diverging member of a population stops alone, and its last finite state is kept.
  Arguments and returns as for `train_step`.
  """
  new, step_metrics = train_step(state, batch, loss_weights=loss_weights, axis_name=axis_name)
  running = state.stopped_at == 0
  ok = running & jnp.isfinite(step_metrics['loss']) & jnp.isfinite(step_metrics['grad_norm'])
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
  stopped_at = jnp.where(running & ~ok, new.step, state.stopped_at).astype(state.stopped_at.dtype)
  return kept.replace(step=new.step, stopped_at=stopped_at), step_metrics


def eval_step(state: TrainState, batch: dict) -> dict:
  """Predictions and per-image confusion counts of the evaluation parameters.

  Returns:
    `predictions` `[B, H, W]` int32 and the `metrics.confusion` counts, per image.
  """
  logits = state.apply_fn(state.variables(state.eval_params), batch['image'], train=False, **state.scales)
  predictions = metrics.predict(logits)
  return {'predictions': predictions, **metrics.confusion(predictions, batch['mask'], logits.shape[-1])}


def knockout_step(state: TrainState, batch: dict, scales: dict) -> dict:
  """Per-image Dice of the evaluation parameters under each row of apply-time knock-out scales.

  A pure function of (state, batch, scales), vmapped over the rows, so every knock-out mask of
  a trained model is evaluated in one call.

  Args:
    state: the train state.
    batch: `image` `[B, H, W, C]`, `mask` `[B, H, W]`.
    scales: `skip_scale` `[M, depth]`, `residual_scale` and `branch_scale`
      `[M, 2 * depth + 1]`, `skip_fill` (one `[M, C_level]` per level): the `UNet` arguments of
      those names, one row per knock-out; they replace the state's own train-time `scales` of
      the same name.

  Returns:
    `dice`: `[B, M]` float32, classes averaged (the foreground for binary models).
  """
  variables = state.variables(state.eval_params)

  def one(row):
    logits = state.apply_fn(variables, batch['image'], train=False, **{**state.scales, **row})
    counts = metrics.confusion(metrics.predict(logits), batch['mask'], logits.shape[-1])
    return metrics.class_scores(counts)['dice'].mean(-1)

  return {'dice': jax.vmap(one, out_axes=1)(scales)}


def skip_means_step(state: TrainState, batch: dict) -> dict:
  """Per-image spatial means of every skip tensor (the encoder blocks' outputs) under the
  evaluation parameters: `skip_<level>` `[B, C_level]`. Averaged over a split they are the
  fills of a mean-ablation (`UNet(skip_fill=...)`)."""
  variables = state.variables(state.eval_params)

  def encoder(module, method):
    return method == '__call__' and (module.name or '').startswith('enc_')

  _, captured = state.apply_fn(
    variables, batch['image'], train=False, capture_intermediates=encoder, mutable=['intermediates'], **state.scales
  )
  blocks = captured['intermediates']
  return {
    f'skip_{name.removeprefix("enc_")}': blocks[name]['__call__'][0].astype(jnp.float32).mean((1, 2))
    for name in blocks
    if name.startswith('enc_')
  }
