"""Shared fixtures: the small embedded datasets, built once per test session; the environment of every test.

Set before JAX is imported, so this process, both xdist workers and every subprocess they start
inherit it: one persistent JAX compilation cache, fresh for each session (the subprocesses
compile the same few quick runs dozens of times).
"""

import os
import tempfile

if 'PYTEST_XDIST_WORKER' not in os.environ:  # the session's first process: the workers inherit its cache
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='resunet_jax-tests-jax-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest  # noqa: E402

from resunet_jax import data  # noqa: E402

SMALL = ('synthetic_roads/small', 'synthetic_cells/small', 'synthetic_cells/three_class_small')


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A TFDS data directory holding the small configs of the embedded datasets."""
  directory = str(tmp_path_factory.mktemp('tfds'))
  for name in SMALL:
    data.sources.prepare_embedded(name, directory)
  return directory


@pytest.fixture
def data_config(tfds_dir):
  """`config.data` for the small roads dataset at 64x64."""
  config = data.default_config()
  config.name, config.data_dir, config.image_size = 'synthetic_roads/small', tfds_dir, 64
  config.read_threads, config.prefetch = 2, 4
  return config


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, tfds_dir):
  """A quick-config run (checkpoints 3 and 6, both with validation metrics) and its environment."""
  import os
  import pathlib
  import subprocess
  import sys

  env = {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}
  workdir = tmp_path_factory.mktemp('trained_run')
  command = [sys.executable, 'experiments/train.py', '--model=resunet', '--config=experiments/configs/quick.py']
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([*command, f'--workdir={workdir}'], cwd=root, capture_output=True, text=True, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, env
