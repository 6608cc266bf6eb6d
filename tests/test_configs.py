"""Every checked-in experiment config builds, and its model resolves with every preset."""

import importlib.util
import pathlib

import pytest

from resunet_jax import ablation, configs, data, models
from resunet_jax.errors import UserError
from studies.skip_residual import protocol

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(
  [
    *(ROOT / 'experiments' / 'configs').glob('*.py'),
    *(ROOT / 'studies').glob('*/config*.py'),
    *(ROOT / 'studies').glob('*/configs/*.py'),
  ]
)


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_the_configs_the_issues_name_exist():
  assert {
    'default.py',
    'quick.py',
    'tpu_pod.py',
    'ablate.py',
    'ablate_quick.py',
    'ablate_depth.py',
  } <= {p.name for p in CONFIGS}
  studies = {str(p.relative_to(ROOT)) for p in CONFIGS if p.parts[-3:-1] != ('experiments', 'configs')}
  assert studies == {
    'studies/skip_paths/config.py',
    *(f'studies/skip_residual/configs/{name}.py' for name in ('study', 'quick', 'gpu', 'tpu_pod')),
  }


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize('name', list(models.PRESETS))
def test_config_builds(path, name):
  config = _load(path)
  base = configs.base_config()
  if 'ablation' in config and 'protocol' in config.ablation:  # the study: its settings, and its tuning runs build
    assert set(config.ablation) == {*ablation.section(), 'protocol'}
    assert set(config.ablation.protocol) == set(protocol.section())
    runs = protocol.tune_runs(config.ablation.protocol, protocol.base_config(config))
    assert runs and all(run.config(protocol.base_config(config)).train.num_steps > 0 for run in runs)
  elif 'ablation' in config:  # an ablation grid: every run of it must build too
    assert ablation.run_specs(config)
    assert set(config.ablation) == set(ablation.section())
  assert set(config) - {'ablation'} == set(base)
  for section in ('model', 'data', 'train', 'parallel', 'runtime'):
    assert set(config[section]) == set(base[section]), section
  assert set(config.model) == set(models.ModelConfig.field_names())
  assert isinstance(configs.resolve_model(name, config.model, num_classes=1), models.ModelConfig)
  assert config.parallel.strategy in ('jit', 'pmap')
  assert config.train.batch_size > 0 and config.train.num_steps > 0


def test_model_section_overrides_the_preset_and_dataset_classes():
  section = configs.model_section()
  section.norm = 'group'
  config = configs.resolve_model('resunet_zhang', section, num_classes=3)
  assert (config.norm, config.depth, config.block, config.num_classes) == ('group', 3, 'preact', 3)
  section.num_classes = 5  # an explicit value wins over the dataset's
  assert configs.resolve_model('unet', section, num_classes=3).num_classes == 5
  with pytest.raises(UserError, match='unknown model preset'):
    configs.resolve_model('nope', section)


def test_data_section_is_the_pipeline_default():
  assert configs.base_config().data.to_dict() == data.default_config().to_dict()


def test_config_hash_is_stable_and_sensitive():
  a = configs.base_config().to_dict()
  b = configs.base_config().to_dict()
  assert configs.config_hash(a) == configs.config_hash(b)
  b['seed'] = 1
  assert configs.config_hash(a) != configs.config_hash(b)
  # Where and how fast a run executes is not what it computes.
  c = configs.base_config().to_dict()
  c['data']['read_threads'], c['parallel']['process_id'], c['parallel']['heartbeat_timeout_s'] = 16, 3, 10
  assert configs.config_hash(c) == configs.config_hash(a)
  # A key added later hashes as before at the value earlier runs had, and forks the run at another.
  d = {**configs.base_config().to_dict(), 'model': models.preset('unet').to_dict()}  # as resolved
  legacy = {**d, 'model': {k: v for k, v in d['model'].items() if k not in ('init', 'shortcut', 'skip_kind')}}
  assert configs.config_hash(d) == configs.config_hash(legacy)  # the study's committed run ids stay valid
  d['model']['init'] = 'he'
  assert configs.config_hash(d) != configs.config_hash(legacy)
  d['model'] = {**d['model'], 'init': 'lecun', 'skip_kind': 'attention'}
  assert configs.config_hash(d) != configs.config_hash(legacy)
