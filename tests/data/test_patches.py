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


def test_an_image_smaller_than_the_patch_is_padded_and_the_padding_weighs_zero():
  element = _element()
  small = {**element, 'image': element['image'][:20, :40], 'mask': element['mask'][:20, :40] + 1}
  patch = transforms.RandomPatch(PATCH, 0.5).random_map(small, np.random.default_rng(0))
  assert patch['image'].shape == (PATCH, PATCH, 3) and patch['weight'].shape == (PATCH, PATCH)
  real = patch['weight'] == 1
  assert real.sum() == 20 * PATCH  # every row of the image, a 32-wide window of its 40 columns
  assert not real[20:].any() and real[:20].all()  # padding below the image only
  left = int(patch['image'][0, 0, 1])
  np.testing.assert_array_equal(patch['image'][:20], small['image'][:, left : left + PATCH])  # not resampled
  assert (patch['mask'][~real] == 0).all() and (patch['mask'][real] > 0).all()
  normalized = transforms.Normalize(data.normalization.Normalization('fixed', 3, (0.5,) * 3, (0.25,) * 3))
  out = normalized.map(transforms.RandomFlipRotate().random_map(patch, np.random.default_rng(5)))
  np.testing.assert_array_equal(out['image'][out['weight'] == 0], 0.0)  # as the sliding window pads
  assert out['weight'].dtype == np.float32 and (out['mask'][out['weight'] == 0] == 0).all()
  assert (out['mask'][out['weight'] == 1] > 0).all()  # flipped together


def test_a_mask_of_another_size_than_its_image_is_a_one_line_error():
  bad = {**_element(), 'mask': np.zeros((20, 40), np.uint8)}
  with pytest.raises(DataError, match=r'blob: mask \(20, 40\) and image \(200, 200\) differ'):
    transforms.RandomPatch(PATCH).random_map(bad, np.random.default_rng(0))


@pytest.mark.parametrize('channels', [1, 3])
def test_the_loss_and_metrics_of_a_padded_patch_are_those_of_its_image_alone(channels):
  import jax.numpy as jnp

  from resunet_jax import losses, metrics

  rng = np.random.default_rng(channels)
  logits = rng.normal(size=(2, 12, 16, channels)).astype(np.float32)
  masks = rng.integers(0, max(channels, 2), size=(2, 12, 16)).astype(np.int32)
  padded_logits = np.pad(logits, [(0, 0), (0, 6), (0, 3), (0, 0)], constant_values=3.0)  # confident junk
  padded_masks = np.pad(masks, [(0, 0), (0, 6), (0, 3)])
  weight = np.pad(np.ones((2, 12, 16), np.float32), [(0, 0), (0, 6), (0, 3)])
  terms = losses.LossWeights(cross_entropy=1.0, dice=1.0)
  alone = losses.per_example_loss(jnp.asarray(logits), jnp.asarray(masks), terms)
  masked = losses.per_example_loss(jnp.asarray(padded_logits), jnp.asarray(padded_masks), terms, jnp.asarray(weight))
  np.testing.assert_allclose(masked, alone, rtol=1e-5)
  unmasked = losses.per_example_loss(jnp.asarray(padded_logits), jnp.asarray(padded_masks), terms)
  assert np.abs(np.asarray(unmasked) - np.asarray(alone)).min() > 1e-3  # the padding would count otherwise
  predictions = np.asarray(metrics.predict(jnp.asarray(logits)))
  padded_predictions = np.asarray(metrics.predict(jnp.asarray(padded_logits)))
  expected = metrics.confusion(predictions, masks, channels)
  counted = metrics.confusion(padded_predictions, padded_masks, channels, weight)
  for key in expected:
    np.testing.assert_allclose(counted[key], expected[key], rtol=1e-6)


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


def test_training_on_patches_with_images_smaller_than_the_patch_runs_and_scores_them_whole(tmp_path, commands):
  import json
  import os
  import sys

  from PIL import Image

  rng = np.random.default_rng(0)
  for split, sizes in (('train', [(48, 48), (20, 30), (40, 24)]), ('validation', [(20, 30)]), ('test', [(26, 40)])):
    for i, (h, w) in enumerate(sizes):
      for kind in ('images', 'masks'):
        (tmp_path / 'data' / split / kind).mkdir(parents=True, exist_ok=True)
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(image).save(tmp_path / 'data' / split / 'images' / f'{i}.png')
      Image.fromarray(((image[..., 0] > 128) * 255).astype(np.uint8)).save(
        tmp_path / 'data' / split / 'masks' / f'{i}.png'
      )
  workdir = tmp_path / 'run'
  env = {**os.environ, 'XLA_FLAGS': ''}
  train = [
    sys.executable, 'experiments/train.py', '--model=unet', '--config=experiments/configs/quick.py',
    f'--config.data.folder={tmp_path / "data"}', '--config.data.name=folder', '--config.data.patch_size=32',
    '--config.data.evaluation=whole', '--config.train.num_steps=3', '--config.train.batch_size=2',
    f'--workdir={workdir}',
  ]  # fmt: skip
  result = commands.run(train, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(r['loss']) for r in records if r['split'] == 'train')
  evaluate = [sys.executable, 'experiments/evaluate.py', f'--workdir={workdir}', '--split=test', '--checkpoint=latest']
  result = commands.run(evaluate, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / 'eval_test.json').read_text())
  assert record['images'] == 1 and record['evaluation'] == 'whole'
