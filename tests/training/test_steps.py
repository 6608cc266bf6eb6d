"""The pure steps and the optimizer, called directly (one device)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import configs, losses, models
from resunet_jax.training import state as state_lib
from resunet_jax.training import steps


def _state(num_classes=1, ema_decay=0.0, norm='none', model_config=None, **train):
  config = configs.train_section()
  config.update(train)
  model_config = model_config or models.ModelConfig(base_width=4, depth=2, num_classes=num_classes, norm=norm)
  model = models.UNet(model_config)
  return state_lib.create_train_state(
    model, state_lib.make_optimizer(config), (1, 16, 16, 3), seed=0, ema_decay=ema_decay
  )


def _batch(classes=2, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32),
    'mask': jnp.asarray(rng.integers(0, classes, (2, 16, 16)), jnp.int32),
    'valid': jnp.ones(2),
  }


STEP = jax.jit(functools.partial(steps.train_step, loss_weights=losses.LossWeights()))


def test_ema_tracks_the_parameters():
  state = _state(ema_decay=0.9)
  before = state.params
  state, _ = STEP(state, _batch())
  expected = jax.tree.map(lambda p0, p1: 0.9 * p0 + 0.1 * p1, before, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), state.ema_params, expected)
  assert state.eval_params is state.ema_params
  plain = _state()
  assert plain.ema_params == {} and plain.eval_params is plain.params


def test_multiclass_step_and_eval():
  state = _state(num_classes=3, norm='batch')
  state, metrics = STEP(state, _batch(classes=3))
  assert np.isfinite(metrics['loss']) and 0 <= metrics['dice'] <= 1
  assert {f'grad_norm/{name}' for name in ('enc_0', 'enc_1', 'bottleneck', 'dec_1', 'dec_0', 'head')} <= set(metrics)
  out = jax.jit(steps.eval_step)(state, _batch(classes=3))
  assert out['predictions'].shape == (2, 16, 16) and out['tp'].shape == (2, 3)


def test_a_deeply_supervised_step_weighs_every_head():
  """The loss is the weighted sum of the heads' losses (nnU-Net's halving by default, the config's
  weights when given), and the auxiliary heads learn from it; the reported metrics are the main head's."""
  state = _state(model_config=models.preset('unet_plusplus', base_width=4, depth=3))
  batch = _batch()
  heads = state.apply_fn(state.variables(), batch['image'], train=True, all_heads=True)
  each = [float(losses.segmentation_loss(h, batch['mask'], batch['valid'], losses.LossWeights())) for h in heads]
  assert len(set(each)) == 3
  halving = losses.segmentation_loss(heads, batch['mask'], batch['valid'], losses.LossWeights())
  np.testing.assert_allclose(halving, 4 / 7 * each[0] + 2 / 7 * each[1] + 1 / 7 * each[2], rtol=1e-5)
  weights = (0.25, 0.75, 0.0)
  step = jax.jit(functools.partial(steps.train_step, loss_weights=losses.LossWeights(deep_supervision=weights)))
  _, metrics = step(state, batch)
  np.testing.assert_allclose(metrics['loss'], 0.25 * each[0] + 0.75 * each[1], rtol=1e-5)
  learns = {name: bool(metrics[f'grad_norm/{name}'] > 0) for name in ('head', 'aux_2', 'aux_1')}
  assert learns == {'head': True, 'aux_2': True, 'aux_1': False}  # a zero weight: that head gets no gradient


def test_deep_supervision_weights_are_checked():
  assert losses.deep_supervision_weights(2) == (2 / 3, 1 / 3)
  with pytest.raises(ValueError, match='has 2 entries for a model with 3 heads'):
    losses.deep_supervision_weights(3, (1.0, 1.0))
  with pytest.raises(ValueError, match='non-negative and not all zero'):
    losses.deep_supervision_weights(2, (0.0, 0.0))


def test_schedule_warms_up_and_decays():
  config = configs.train_section()
  config.update(learning_rate=0.5, warmup_steps=10, num_steps=110, final_lr_fraction=0.01)
  schedule = state_lib.make_schedule(config)
  assert schedule(0) == 0.0
  assert schedule(5) == pytest.approx(0.25)
  assert schedule(10) == pytest.approx(0.5)
  assert schedule(60) == pytest.approx(0.5 * (0.01 + 0.99 * 0.5))  # half-way down the cosine
  assert schedule(110) == pytest.approx(0.005)


def test_unknown_optimizer_is_refused():
  config = configs.train_section()
  config.optimizer = 'adam_w'
  with pytest.raises(ValueError, match="train.optimizer='adam_w' is not one of adamw, sgd"):
    state_lib.make_optimizer(config)
