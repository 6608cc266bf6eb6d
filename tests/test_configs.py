"""Every checked-in experiment config builds and resolves with every preset."""

import importlib.util
import pathlib

import pytest

from resunet_jax import cli, models

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'configs').glob('*.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize('name', list(models.PRESETS))
def test_config_builds(path, name):
  config = _load(path)
  assert set(config.model) == set(models.ModelConfig.field_names())
  assert isinstance(cli.resolve_model(name, config.model), models.ModelConfig)


def test_model_section_overrides_the_preset():
  section = cli.model_config_dict()
  section.norm = 'group'
  config = cli.resolve_model('resunet_zhang', section)
  assert (config.norm, config.depth, config.block) == ('group', 3, 'preact')
  with pytest.raises(cli.UserError, match='unknown model preset'):
    cli.resolve_model('nope', section)
