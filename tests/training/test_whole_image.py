"""Whole-image evaluation (`data.evaluation='whole'`): every pixel of an image is scored at its own
size through the sliding window, never a resized copy."""

import numpy as np
import pytest
from PIL import Image

from resunet_jax import data
from resunet_jax.errors import DataError
from resunet_jax.training import evaluation

SIDE = 1000


class _SignOfTheImage:
  """A stand-in train state whose 'model' predicts foreground where the normalised first channel
  is positive: what it scores is decided by the pixels alone, so a test can know every answer."""

  eval_params, scales = {}, {}

  @staticmethod
  def apply_fn(variables, images, train=False):
    del variables, train
    return images[..., :1]

  def variables(self, params):
    return {}


def _write(root, split, stem, image, mask):
  for kind, array in (('images', image), ('masks', mask)):
    (root / split / kind).mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(root / split / kind / f'{stem}.png')


@pytest.fixture(scope='module')
def stripes(tmp_path_factory):
  """1000x1000 images of 1-px vertical stripes: resized to any smaller size they blur away."""
  root = tmp_path_factory.mktemp('stripes')
  stripes = np.where(np.arange(SIDE) % 2 == 0, 255, 0).astype(np.uint8)[None, :].repeat(SIDE, 0)
  image = np.stack([stripes] * 3, -1)
  other = stripes.copy()
  other[:, : SIDE // 4] = 255  # a quarter of the columns wrongly labelled foreground
  _write(root, 'validation', 'exact', image, stripes)
  _write(root, 'validation', 'quarter', image, other)
  for split in ('train', 'test'):
    _write(root, split, 'small', image[:64, :64], stripes[:64, :64])
  return root, stripes, other


def _config(root, mode):
  config = data.default_config()
  config.name, config.folder, config.image_size, config.evaluation = 'folder', str(root), 64, mode
  return config


def test_every_pixel_is_scored_at_its_own_size(stripes):
  root, truth, other = stripes
  per_image, samples = evaluation.evaluate_split(
    None, _SignOfTheImage(), _config(root, 'whole'), None, batch_size=16, boundary_tolerance=2.0, keep=1
  )
  dice = dict(zip(per_image['id'], per_image['dice'], strict=True))
  assert dice['exact'] == 1.0  # every 1-px stripe found: no resize happened
  predicted = truth > 0  # the stand-in predicts the image's stripes
  expected = 2 * (predicted & (other > 0)).sum() / (predicted.sum() + (other > 0).sum())
  assert dice['quarter'] == pytest.approx(expected, rel=1e-6)  # Dice by hand over the 10^6 pixels
  assert samples['image'].shape == (1, 64, 64, 3)  # a tile-sized corner for the figures


def test_the_resize_mode_stays_an_explicit_choice_and_scores_the_resized_copy(stripes):
  root, _, _ = stripes
  config = _config(root, 'resize')
  (batch,) = data.make_pipeline(config, 'validation', batch_size=2, seed=0, train=False)
  assert batch['image'].shape == (2, 64, 64, 3)  # resized: the stripes are gone
  assert np.abs(batch['image']).max() < 2.0  # blurred to grey, no pure 0 or 255 stripe left
  with pytest.raises(DataError, match=r"data.evaluation='tiles' is not one of resize, whole"):
    evaluation.evaluate_split(None, _SignOfTheImage(), _config(root, 'tiles'), None, batch_size=2, boundary_tolerance=2)
