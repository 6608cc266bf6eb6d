"""Shared fixtures: the small embedded datasets and a trained run, each built once per test session
(`shared`: by one xdist worker, the others wait and reuse it); the project's commands started
from one preloaded interpreter (`commands`); the environment of every test.

Set before JAX is imported, so this process, both xdist workers and every command they start
inherit it: one persistent JAX compilation cache of every program, fresh for each session (the
commands compile the same few quick runs dozens of times), LLVM's optimiser off
(`commands.FAST_COMPILE`), and no relaunch with the CPU process settings
(`resunet_jax.cpu.hostmem`: it would start each command twice; tests/cpu/test_hostmem.py starts
it on purpose).
"""

import fcntl
import os
import pathlib
import shutil
import sys
import tempfile

if 'PYTEST_XDIST_WORKER' not in os.environ:  # the session's first process: the workers inherit its cache
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='resunet_jax-tests-jax-cache-'))
# Every program, however quick to compile: a command's dozens of small ones (initialisers, metrics,
# the evaluation) cost about 0.9 s of each 6 s quick run when compiled again in every command.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('RESUNET_HUGE_PAGES', '0')

import commands as commands_lib  # noqa: E402 (tests/commands.py)

os.environ['XLA_FLAGS'] = commands_lib.fast_compile(os.environ.get('XLA_FLAGS', ''))  # before JAX starts
import pytest  # noqa: E402

from resunet_jax import data  # noqa: E402

SMALL = (
  'synthetic_roads/small',
  'synthetic_cells/small',
  'synthetic_cells/three_class_small',
  'synthetic_vessels/small',
)


ROOT = pathlib.Path(__file__).resolve().parents[1]


class Shared:
  """Folders built once per session, by whichever xdist worker asks first; the others wait, then reuse them."""

  def __init__(self, tmp_path_factory):
    self._factory = tmp_path_factory
    base = tmp_path_factory.getbasetemp()
    self._base = base.parent if 'PYTEST_XDIST_WORKER' in os.environ else base  # the session's, above the workers'

  def build(self, name: str, build) -> pathlib.Path:
    """`build(path)` once; returns `path`. For what tests only read: a test that writes takes a `copy`.

    A failed build leaves no mark, so the next worker tries again (and fails with its own error).
    """
    path, done = self._base / name, self._base / f'{name}.done'
    with open(self._base / f'{name}.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        build(path)
        done.touch()
    return path

  def copy(self, source: pathlib.Path) -> pathlib.Path:
    """This worker's copy of a built folder (file times kept), which its tests may change."""
    target = self._factory.mktemp(f'{source.name}_copy') / source.name
    shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture(scope='session')
def shared(tmp_path_factory):
  """`Shared`: `shared.build(name, build)` once per session, `shared.copy(path)` for this worker."""
  return Shared(tmp_path_factory)


@pytest.fixture(scope='session')
def tfds_dir(shared):
  """A TFDS data directory holding the small configs of the embedded datasets (read only)."""

  def build(path):
    for name in SMALL:
      data.sources.prepare_embedded(name, str(path))

  return str(shared.build('tfds', build))


@pytest.fixture(scope='session')
def commands(tmp_path_factory):
  """Starts `[sys.executable, SCRIPT, *ARGS]` as a fork of a preloaded interpreter (tests/commands.py)."""
  launcher = commands_lib.Commands(tmp_path_factory.mktemp('commands'))
  yield launcher
  launcher.close()


@pytest.fixture
def data_config(tfds_dir):
  """`config.data` for the small roads dataset at 64x64."""
  config = data.default_config()
  config.name, config.data_dir, config.image_size = 'synthetic_roads/small', tfds_dir, 64
  config.read_threads, config.prefetch = 2, 4
  return config


@pytest.fixture(scope='session')
def trained_run(shared, tfds_dir, commands):
  """A quick-config run (checkpoints 3 and 6, both with validation metrics), this worker's copy, and its environment."""
  env = {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}
  command = [sys.executable, 'experiments/train.py', '--model=resunet', '--config=experiments/configs/quick.py']

  def build(workdir):
    result = commands.run([*command, f'--workdir={workdir}'], env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

  return shared.copy(shared.build('trained_run', build)), env


@pytest.fixture(scope='session')
def three_class_run(shared, tfds_dir, commands):
  """A 3-class quick run, trained per device (pmap) on 2 devices with BatchNorm: this worker's copy, its environment."""
  env = {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}
  command = [
    sys.executable,
    'experiments/train.py',
    '--model=resunet',
    '--config=experiments/configs/quick.py',
    '--config.data.name=synthetic_cells/three_class_small',
    '--config.parallel.strategy=pmap',
    '--config.model.norm=batch',
  ]

  def build(workdir):
    two = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
    result = commands.run([*command, f'--workdir={workdir}'], env=two, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

  return shared.copy(shared.build('three_class_run', build)), env
