"""Shared fixtures: the small embedded datasets, built once per test session."""

import pytest

from resunet_jax import data

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
