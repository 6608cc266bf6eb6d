"""Ablations as pure config transforms, the grids of the checked-in configs, knock-out masks."""

import importlib.util
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import ablation, configs, models
from resunet_jax.errors import UserError
from resunet_jax.training import state as state_lib
from resunet_jax.training import steps

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'experiments' / 'configs'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_ablate_returns_a_new_config_and_leaves_the_original_alone():
  config = configs.base_config()
  before = config.to_dict()
  ablated = ablation.ablate(config, skips='1011', residual=True)
  assert config.to_dict() == before
  assert (ablated.model.skips, ablated.model.residual) == ('1011', True)
  assert configs.resolve_model(ablated.preset, ablated.model).skip_levels == (True, False, True, True)


@pytest.mark.parametrize(
  ('fields', 'message'),
  [
    ({'skips': '101'}, "skips='101' has 3 entries but depth is 4"),
    ({'skip': 'none'}, "'skip' \\(did you mean 'skips'"),
    ({'residual': 'yes'}, 'residual'),
  ],
)
def test_ablate_validates(fields, message):
  with pytest.raises(UserError, match=message):
    ablation.ablate(configs.base_config(), **fields)


def test_default_grid_is_the_issue_grid():
  specs = ablation.run_specs(_load('ablate'))
  arms = {(s.study, s.arm): (s.residual, s.skips) for s in specs}
  roads = sorted(arm for study, arm in arms if study == 'roads')
  expected = [f'{r}-{s}' for r in ('plain', 'residual') for s in ('all', 'drop0', 'drop1', 'drop2', 'drop3', 'none')]
  assert roads == sorted(expected)
  assert arms['roads', 'residual-drop2'] == (True, '1101')
  assert sorted(arm for study, arm in arms if study == 'cells') == [
    'plain-all',
    'plain-none',
    'residual-all',
    'residual-none',
  ]
  assert len(specs) == (12 + 4) * 3
  seeds = {s.seed for s in specs}
  assert seeds == {0, 1, 2}
  # Each run config is a plain experiment config: no ablation section, its own seed and arm.
  spec = next(s for s in specs if s.arm == 'residual-drop2' and s.seed == 1)
  assert 'ablation' not in spec.config and spec.config.seed == 1
  assert (spec.config.model.skips, spec.config.model.residual, spec.config.data.name) == (
    '1101',
    True,
    'synthetic_roads/size64',
  )


def test_depth_grid_names_arms_by_depth():
  specs = ablation.run_specs(_load('ablate_depth'))
  arms = sorted({s.arm for s in specs})
  assert len(specs) == 30 and 'plain-all-d6' in arms and 'residual-all-d2' in arms
  assert {s.config.model.depth for s in specs} == {2, 3, 4, 5, 6}


def test_grid_mistakes_fail_before_training():
  config = _load('ablate_quick')
  config.ablation.studies.roads.skips = ('all', '111')
  with pytest.raises(UserError, match="skips '111' has 3 levels but depth is 2"):
    ablation.run_specs(config)
  config.ablation.studies.roads.skips = ('some',)
  with pytest.raises(UserError, match="skip variant 'some' is not valid"):
    ablation.run_specs(config)
  config.ablation.seeds = 0
  with pytest.raises(UserError, match='ablation.seeds=0'):
    ablation.run_specs(config)
  with pytest.raises(UserError, match='no `ablation` section'):
    ablation.run_specs(configs.base_config())


def test_masks():
  masks = ablation.skip_masks(3)
  assert masks.shape == (8, 3) and len({tuple(m) for m in masks}) == 8
  np.testing.assert_array_equal(masks[5], [1, 0, 1])  # bit l of the row index keeps level l
  labels, rows = ablation.residual_masks(2)
  assert labels == ['none', '-enc_0', '-enc_1', '-bottleneck', '-dec_1', '-dec_0', 'all']
  np.testing.assert_array_equal(rows[3], [1, 1, 0, 1, 1])
  assert rows[0].all() and not rows[-1].any()


@pytest.mark.parametrize(('residual', 'num_classes'), [(False, 1), (True, 1), (True, 3)])
def test_knockout_step_equals_one_call_per_mask(residual, num_classes):
  """Per image and mask: the Dice of the foreground (binary) or the mean over the K classes."""
  config = models.ModelConfig(base_width=2, depth=2, residual=residual, num_classes=num_classes)
  model = models.UNet(config)
  state = state_lib.create_train_state(
    model, state_lib.make_optimizer(configs.train_section()), (1, 16, 16, 3), seed=0, ema_decay=0.0
  )
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  masks = jax.random.randint(jax.random.key(2), (3, 16, 16), 0, max(num_classes, 2))
  scales = {'skip_scale': jnp.asarray(ablation.skip_masks(2))}
  if residual:
    scales['residual_scale'] = jnp.asarray(np.tile([[1, 0, 1, 1, 0]], (4, 1)), jnp.float32)
  vmapped = jax.jit(steps.knockout_step)(state, {'image': images, 'mask': masks}, scales)['dice']
  assert vmapped.shape == (3, 4)
  for row in range(4):
    kwargs = {name: value[row] for name, value in scales.items()}
    logits = model.apply(state.variables(state.params), images, train=False, **kwargs)
    predictions = (logits[..., 0] > 0).astype(jnp.int32) if num_classes == 1 else jnp.argmax(logits, -1)
    per_class = []
    for c in [1] if num_classes == 1 else range(num_classes):
      tp = jnp.sum((predictions == c) & (masks == c), (1, 2))
      total = jnp.sum(predictions == c, (1, 2)) + jnp.sum(masks == c, (1, 2))
      per_class.append(jnp.where(total == 0, 1.0, 2 * tp / jnp.maximum(total, 1)))
    dice = jnp.mean(jnp.stack(per_class), 0)
    assert num_classes == 1 or len(set(np.asarray(predictions).ravel())) > 1  # classes really differ
    np.testing.assert_allclose(vmapped[:, row], dice, rtol=1e-6)


def test_sigterm_between_populations_stops_the_next_before_it_trains(monkeypatch, tmp_path):
  """A study nests a sweep's `sigterm_stops` in its own: a SIGTERM that arrives after one sweep
  (or while a population is measured) must stop the next population before its training."""
  monkeypatch.setattr(ablation.runner.loop, 'train_and_evaluate', lambda *a, **k: pytest.fail('trained after SIGTERM'))
  config, previous = _load('quick'), signal.getsignal(signal.SIGTERM)
  with ablation.runner.sigterm_stops():
    with ablation.runner.sigterm_stops():  # a finished stage's sweep
      pass
    signal.raise_signal(signal.SIGTERM)
    with ablation.runner.sigterm_stops(), pytest.raises(ablation.runner.Stopped, match='before training'):
      ablation.runner.run_population(config, [config], tmp_path)
  assert signal.getsignal(signal.SIGTERM) is previous
