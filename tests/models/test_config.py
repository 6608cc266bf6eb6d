"""ModelConfig and presets: defaults, strictness, validation, skip parsing."""

import dataclasses

import pytest

from resunet_jax import configs, models


def test_defaults_are_the_note_unet():
  config = models.ModelConfig()
  assert (config.base_width, config.depth, config.residual, config.norm, config.upsample) == (
    64,
    4,
    False,
    'none',
    'nearest',
  )
  assert config.widths() == (64, 128, 256, 512, 1024)
  assert config.skip_levels == (True,) * 4
  assert models.preset('unet') == config


def test_unet_and_resunet_differ_only_by_residual():
  unet, resunet = models.preset('unet'), models.preset('resunet')
  differing = [f for f in unet.field_names() if getattr(unet, f) != getattr(resunet, f)]
  assert differing == ['residual']


def test_frozen_and_hashable():
  config = models.preset('resunet', skips=[True, False, True, True])
  assert config.skips == (True, False, True, True)  # lists are stored as tuples
  assert hash(config) == hash(models.preset('resunet', skips=(True, False, True, True)))
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.depth = 3


@pytest.mark.parametrize(
  'build',
  [
    lambda: models.ModelConfig(base_widht=16),
    lambda: models.ModelConfig.from_dict({'base_widht': 16}),
    lambda: models.preset('unet', base_widht=16),
    lambda: models.preset('unet').replace(base_widht=16),
  ],
)
def test_unknown_field_names_valid_fields(build):
  with pytest.raises(ValueError, match=r"'base_widht' \(did you mean 'base_width'\?\); valid: base_width, depth"):
    build()


def test_unknown_preset_lists_presets():
  with pytest.raises(
    ValueError,
    match=r"unknown model preset 'resnet'.*presets: unet, resunet, attention_unet, unet_plusplus, resunet_zhang",
  ):
    models.preset('resnet')


@pytest.mark.parametrize(
  ('overrides', 'message'),
  [
    ({'base_width': -8}, 'base_width=-8 must be a positive integer'),
    ({'base_width': 8.0}, 'base_width=8.0 must be a positive integer'),
    ({'depth': 0}, 'depth=0 must be a positive integer'),
    ({'depth': 9}, 'depth=9 is above 8'),
    ({'num_classes': True}, 'num_classes=True must be a positive integer'),
    ({'residual': 'yes'}, "residual='yes' must be True or False"),
    ({'norm': 'btach'}, "norm='btach' \\(did you mean 'batch'\\?\\); valid: none, batch, group, layer"),
    ({'upsample': 'deconv'}, 'valid: nearest, bilinear, transpose'),
    ({'dtype': 'float64'}, 'valid: float32, bfloat16, float16'),
    ({'skips': '10'}, 'has 2 entries but depth is 4'),
    ({'skips': 'some'}, "skips='some' is not valid"),
    ({'skips': (True, False)}, 'has 2 entries but depth is 4'),
    ({'init': 'kaiming'}, "init='kaiming'; valid: lecun, glorot, he"),
    ({'shortcut': 'ident'}, "shortcut='ident' \\(did you mean 'identity'\\?\\); valid: projection, identity"),
    ({'shortcut': 'identity'}, "shortcut='identity' needs residual=True"),
  ],
)
def test_invalid_values(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.preset('unet', **overrides)


@pytest.mark.parametrize(
  ('skips', 'levels'),
  [
    ('all', (True, True, True)),
    ('none', (False, False, False)),
    ('101', (True, False, True)),
    ((False, True, True), (False, True, True)),
  ],
)
def test_skip_levels(skips, levels):
  assert models.preset('unet', depth=3, skips=skips).skip_levels == levels


def test_replace_keeps_symbolic_skips_valid_across_depths():
  assert models.preset('unet').replace(depth=6).skip_levels == (True,) * 6
  with pytest.raises(ValueError, match='has 4 entries but depth is 6'):
    models.preset('unet', skips='1011').replace(depth=6)


def test_round_trip_through_dict():
  config = models.preset('resunet_zhang', base_width=8, skips='101', dtype='bfloat16')
  assert models.ModelConfig.from_dict(config.to_dict()) == config


def test_a_plain_control_matched_in_parameters_to_the_residual_arm():
  for skips in ('all', 'none'):
    residual = models.preset('resunet', base_width=8, depth=4, skips=skips)
    plain = models.preset('unet', base_width=8, depth=4, skips=skips)
    target = models.param_count(residual)
    assert models.param_count(plain) < 0.96 * target  # the projections: 4-6% more parameters
    scale = models.matched_width_scale(plain, target)
    matched = plain.replace(width_scale=scale)
    assert abs(models.param_count(matched) - target) <= 0.02 * target
    assert matched.widths()[0] >= 8 and matched.widths() != plain.widths()
  with pytest.raises(ValueError, match='no width_scale gives 10 parameters within 2%'):
    models.matched_width_scale(plain, 10)


def test_width_scale_rounds_every_level_and_one_changes_nothing():
  config = models.ModelConfig(base_width=8, depth=3)
  assert config.replace(width_scale=1.0).widths() == config.widths() == (8, 16, 32, 64)
  assert config.replace(width_scale=1.1).widths() == (9, 18, 35, 70)
  with pytest.raises(ValueError, match='width_scale=0 must be a positive number'):
    models.ModelConfig(width_scale=0)
  resolved = {'model': config.to_dict()}
  earlier = {'model': {k: v for k, v in resolved['model'].items() if k != 'width_scale'}}
  assert configs.config_hash(resolved) == configs.config_hash(earlier)  # earlier runs keep their hashes
