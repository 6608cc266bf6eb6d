"""The project's promises: the README's example runs, its commands and the docs pages' are what CI and users run."""

import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
PAGES = {
  path.relative_to(ROOT): path.read_text() for path in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
}


def _blocks(language, text=README):
  return re.findall(rf'```{language}\n(.*?)```', text, flags=re.S)


def test_the_readme_is_short_and_shows_the_modules_first():
  lines = README.splitlines()
  assert len(lines) <= 250
  assert any(line == '## Use the modules in your own code' for line in lines[:80])
  assert '```python' in '\n'.join(lines[:80])


def test_readme_module_example_runs_as_written(capsys):
  (example,) = [block for block in _blocks('python') if 'restore_params' not in block]  # that one: test_export.py
  exec(compile(example, 'README.md', 'exec'), {})
  first, second = capsys.readouterr().out.strip().splitlines()
  assert first == 'none (8, 2, 96, 96, 1)'
  assert second.split()[-4:] == ['(2,', '96,', '96,', '1)']


def test_quickstart_is_two_commands_and_ci_runs_both():
  setup_and_train, setup_and_test = (block.strip() for block in _blocks('bash')[:2])
  assert setup_and_train.endswith('python experiments/train.py --model=resunet')
  assert 'pytest' in setup_and_test
  ci = (ROOT / '.ci' / 'run').read_text().splitlines()
  assert setup_and_test in ci and setup_and_train in ci
  everywhere = {page: _blocks('bash', text) for page, text in PAGES.items()}
  blocks = [block for found in everywhere.values() for block in found]
  tools = [b for b in blocks if 'evaluate.py' in b]  # the main run's (README, docs/evaluation.md), a pruned UNet++'s
  assert len(tools) == 3
  for command in (line for block in tools for line in block.strip().splitlines()):
    assert command in ci, command
  (formats,) = [b for b in blocks if 'write_folder.py' in b]  # the image-format commands (docs/data.md)
  for command in formats.strip().splitlines():
    assert command in ci, command
  exports = [b for b in blocks if 'export.py' in b]
  assert len(exports) >= 2  # the pruned UNet++'s (README) and the export page's
  for command in (line for block in exports for line in block.strip().splitlines()):
    assert 'export.py' not in command or command in ci, command


@pytest.fixture
def train(commands):
  def run(*args, env):
    return commands.run([sys.executable, 'experiments/train.py', *args], env=env, timeout=300)

  return run


def test_summary_builds_the_data_and_reports_the_real_network_and_overrides_win(train, tmp_path):
  # Empty: the first command builds the dataset (the small config of the default one: the full
  # 2,000 images take 15 s more; CI builds those with the README's command).
  env = {**os.environ, 'TFDS_DATA_DIR': str(tmp_path / 'tfds')}
  small = '--config.data.name=synthetic_roads/small'
  result = train('--model=resunet', '--config.model.base_width=64', small, '--summary', env=env)
  assert result.returncode == 0, result.stderr
  splits = "splits {'train': 64, 'validation': 16, 'test': 16}"
  assert f'data: synthetic_roads/small, 2 classes, images (128, 128, 3), {splits}' in result.stdout
  assert 'total         33,122,881' in result.stdout
  assert 'logits (1, 128, 128, 1) float32' in result.stdout
  # A config override wins over the preset.
  result = train(
    '--model=resunet', '--config.model.residual=False', '--config.model.base_width=64', small, '--summary', env=env
  )
  assert result.returncode == 0, result.stderr
  assert 'residual=False' in result.stdout and 'total         31,378,945' in result.stdout


def test_a_config_files_preset_is_trained_unless_model_is_given(train, tmp_path, tfds_dir):
  config = tmp_path / 'unet_config.py'
  config.write_text(
    'import runpy\n'
    f'quick = runpy.run_path({str(ROOT / "experiments/configs/quick.py")!r})\n'
    'def get_config():\n'
    '  config = quick["get_config"]()\n'
    "  config.preset = 'unet'\n"
    '  return config\n'
  )
  env = {**os.environ, 'TFDS_DATA_DIR': tfds_dir}
  from_file = train(f'--config={config}', '--summary', env=env)
  assert from_file.returncode == 0, from_file.stderr
  assert 'model: unet ModelConfig(' in from_file.stdout and 'residual=False' in from_file.stdout
  given = train(f'--config={config}', '--model=resunet_zhang', '--summary', env=env)
  assert given.returncode == 0, given.stderr
  assert 'model: resunet_zhang ModelConfig(' in given.stdout and "norm='batch'" in given.stdout


def test_the_models_package_imports_only_jax_flax_and_the_standard_library():
  """What a researcher imports stays plain Flax: nothing of the package outside `models` (data,
  training, the CPU backend) and no other third-party library, at any depth of a module."""
  import ast

  allowed = {'jax', 'flax', *sys.stdlib_module_names}
  for path in sorted((ROOT / 'resunet_jax' / 'models').glob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module]
      else:
        continue
      for name in names:
        assert name.startswith('resunet_jax.models') or name.split('.')[0] in allowed, f'{path.name} imports {name}'


def test_one_rule_decides_every_verdict_word():
  """`ablation.decision.decide` is the only code that picks a verdict word: no other module of the
  library or of a study spells one out as a value."""
  import ast

  words = {'supported', 'not supported', 'inconclusive', 'inconclusive at this budget', 'equivalent within +-delta'}
  sources = [*(ROOT / 'resunet_jax').rglob('*.py'), *(ROOT / 'studies').rglob('*.py')]
  for path in sources:
    if path == ROOT / 'resunet_jax' / 'ablation' / 'decision.py':
      continue
    tree = ast.parse(path.read_text())
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not literals & words, f'{path.relative_to(ROOT)} spells out a verdict word: {literals & words}'


def test_the_ablation_library_imports_no_study():
  """`resunet_jax.ablation` is general: importing it loads no module of `studies/`."""
  import subprocess

  code = 'import sys, resunet_jax.ablation; print(sorted(m for m in sys.modules if m.startswith("studies")))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
  assert out.strip() == '[]'


def _package_imports(path):
  """The `resunet_jax.*` and `studies.*` modules a file imports, at any depth of it."""
  import ast

  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names |= {node.module} | {f'{node.module}.{alias.name}' for alias in node.names}
  return {name for name in names if name.split('.')[0] in ('resunet_jax', 'studies')}


def test_imports_run_one_way():
  """configs owns the config sections and imports nothing of training; training (evaluation
  included) imports neither the ablation tools nor the command line; the library no study."""
  package = ROOT / 'resunet_jax'
  above = {
    package / 'configs.py': ('resunet_jax.training', 'resunet_jax.ablation', 'resunet_jax.cli', 'studies'),
    **{path: ('resunet_jax.ablation', 'resunet_jax.cli', 'studies') for path in (package / 'training').glob('*.py')},
    **{path: ('studies', 'resunet_jax.cli') for path in (package / 'ablation').glob('*.py')},
  }
  for path, forbidden in above.items():
    bad = [name for name in _package_imports(path) if name.startswith(forbidden)]
    assert not bad, f'{path.relative_to(ROOT)} imports {bad}'
  assert not (package / 'evaluation.py').exists()  # it lives in training/, below the loop that calls it
