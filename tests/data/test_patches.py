"""Patch training at native resolution: `data.patch_size` crops at scale 1, with a seeded share of
patches made to hold foreground (`data.foreground_oversampling`)."""

import math
import pathlib
import runpy

import numpy as np
import pytest

from resunet_jax import configs, data
from resunet_jax.data import transforms
from resunet_jax.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIDE, PATCH, BLOB = 200, 32, (100, 103)  # a 3x3 foreground blob at rows and columns 100-102


def _element():
  rows, cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing='ij')
  image = np.stack([rows, cols, rows ^ cols], -1).astype(np.uint16)  # each pixel names its place
  mask = np.zeros((SIDE, SIDE), np.uint8)
  mask[BLOB[0] : BLOB[1], BLOB[0] : BLOB[1]] = 1
  return {'image': image, 'mask': mask, 'id': 'blob'}


def _uniform_hit_rate():
  """The exact chance that a uniformly placed patch holds a blob pixel: per axis, the tops whose
  window meets the blob's rows, over all tops."""
  tops = SIDE - PATCH + 1
  meeting = (BLOB[1] - 1) - max(0, BLOB[0] - PATCH + 1) + 1
  return (meeting / tops) ** 2


@pytest.mark.parametrize('share', [0.0, 1 / 3, 0.8])
def test_the_share_of_patches_with_foreground_is_the_configured_oversampling(share):
  sampler, element = transforms.RandomPatch(PATCH, share), _element()
  rng = np.random.default_rng(0)
  draws = 4000
  hits = sum(bool(sampler.random_map(element, rng)['mask'].any()) for _ in range(draws))
  q = _uniform_hit_rate()
  expected = share + (1 - share) * q  # forced patches always hold it; the others by chance
  assert abs(hits / draws - expected) < 4 * math.sqrt(expected * (1 - expected) / draws) + 1e-9, (hits, expected)


def test_a_patch_is_the_image_and_mask_at_their_own_scale():
  sampler, element = transforms.RandomPatch(PATCH, 0.5), _element()
  rng = np.random.default_rng(1)
  seen = set()
  for _ in range(50):
    patch = sampler.random_map(element, rng)
    top, left = int(patch['image'][0, 0, 0]), int(patch['image'][0, 0, 1])
    window = np.s_[top : top + PATCH, left : left + PATCH]
    np.testing.assert_array_equal(patch['image'], element['image'][window])  # no resampling
    np.testing.assert_array_equal(patch['mask'], element['mask'][window])
    seen.add((top, left))
  assert len(seen) > 40  # placed anew each time
  empty = {**element, 'mask': np.zeros_like(element['mask'])}  # nothing to oversample: placed uniformly
  assert transforms.RandomPatch(PATCH, 1.0).random_map(empty, rng)['image'].shape == (PATCH, PATCH, 3)


def test_an_image_smaller_than_the_patch_is_a_one_line_error():
  small = {**_element(), 'image': np.zeros((20, 40, 3), np.uint8), 'mask': np.zeros((20, 40), np.uint8)}
  with pytest.raises(DataError, match=r'blob is 20x40, smaller than data.patch_size=32; set data.patch_size'):
    transforms.RandomPatch(PATCH).random_map(small, np.random.default_rng(0))


def test_the_pipeline_trains_on_patches_and_the_default_run_keeps_its_hash(data_config):
  data_config.patch_size = 24
  batches = [next(iter(data.make_pipeline(data_config, 'train', batch_size=4, seed=3, train=True))) for _ in range(2)]
  assert batches[0]['image'].shape == (4, 24, 24, 3) and batches[0]['mask'].shape == (4, 24, 24)
  np.testing.assert_array_equal(batches[0]['image'], batches[1]['image'])  # a function of the seed
  (validation, *_) = data.make_pipeline(data_config, 'validation', batch_size=4, seed=0, train=False)
  assert validation['image'].shape == (4, 64, 64, 3)  # evaluation is not patched
  data_config.foreground_oversampling = 1.5
  with pytest.raises(DataError, match=r'data.foreground_oversampling=1.5 must be in \[0, 1\]'):
    data.make_pipeline(data_config, 'train', batch_size=4, seed=3, train=True)
  # The data keys added since (patch_size, foreground_oversampling, evaluation, folder_layout,
  # folder_hint) at their defaults leave every earlier run's identity, its folder, unchanged: the
  # default experiment config hashes as at 8d719a7, where it was 02ac9618 (computed there).
  config = runpy.run_path(str(ROOT / 'experiments/configs/default.py'))['get_config']()
  assert configs.config_hash(config.to_dict()) == '02ac9618'
  config.data.patch_size = 64
  assert configs.config_hash(config.to_dict()) != '02ac9618'
