"""Sliding-window inference: exact on one tile, seamless on large images and volumes, flip TTA, memory bound."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import inference, models

CONFIG = models.ModelConfig(base_width=4, depth=2, residual=True, num_classes=2)
MODEL = models.UNet(CONFIG)
VARIABLES = MODEL.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)


def apply_fn(variables, x):
  return MODEL.apply(variables, x, train=False)


DIRECT = jax.jit(apply_fn)


def _image(h, w, seed=0):
  return np.random.default_rng(seed).normal(size=(h, w, 3)).astype(np.float32)


@pytest.mark.parametrize('blend', inference.BLENDS)
def test_one_tile_equals_direct_inference(blend):
  image = _image(32, 32)
  out = inference.sliding_window(apply_fn, VARIABLES, image, tile=32, blend=blend, batch_size=2)
  np.testing.assert_allclose(out, DIRECT(VARIABLES, image[None])[0], rtol=1e-6, atol=1e-6)


def test_small_images_are_padded_and_cropped():
  out = inference.sliding_window(apply_fn, VARIABLES, _image(20, 27), tile=32)
  assert out.shape == (20, 27, 2)


def test_large_image_is_seamless():
  """Generous overlap: the blend stays close to whole-image inference (same fully convolutional net).

  Tolerance: tiles see zero padding where the whole image has context, so their borders
  differ; Gaussian weights leave those borders little say. Measured here, relative to the
  logits' range: overlap 0.75 max 0.25%, mean 0.015%; overlap 0, constant weights max 23%.
  """
  image = _image(96, 128, seed=1)
  direct = np.asarray(DIRECT(VARIABLES, image[None])[0])
  blended = inference.sliding_window(apply_fn, VARIABLES, image, tile=48, overlap=0.75, batch_size=4)
  scale = direct.max() - direct.min()
  assert np.abs(blended - direct).max() / scale < 0.01
  assert np.abs(blended - direct).mean() / scale < 0.001
  # Without overlap and with constant weights, tile seams are far larger: the test can fail.
  seams = inference.sliding_window(apply_fn, VARIABLES, image, tile=48, overlap=0.0, blend='constant')
  assert np.abs(seams - direct).max() > 10 * np.abs(blended - direct).max()


def test_flip_tta_is_the_mean_of_flipped_predictions():
  image = _image(32, 32, seed=2)
  tta = inference.sliding_window(apply_fn, VARIABLES, image, tile=32, flip_tta=True)
  flips = []
  for axes in ((), (1,), (0,), (0, 1)):
    flipped = np.flip(image, axes) if axes else image
    out = np.asarray(DIRECT(VARIABLES, np.ascontiguousarray(flipped)[None])[0])
    flips.append(np.flip(out, axes) if axes else out)
  np.testing.assert_allclose(tta, np.mean(flips, 0), rtol=1e-5, atol=1e-5)


def test_device_memory_is_bounded_by_the_tile_batch():
  shapes = []

  def recording_apply(variables, x):
    shapes.append(x.shape)
    return MODEL.apply(variables, x, train=False)

  image = _image(200, 136)
  out = inference.sliding_window(recording_apply, VARIABLES, image, tile=32, overlap=0.5, batch_size=3)
  assert out.shape == (200, 136, 2)
  assert set(shapes) == {(3, 32, 32, 3)}  # traced once, on the tile batch only
  # 12 x 8 = 96 tiles: the last batch of 3 is full, so one of 5 leaves two padding slots.
  assert len(inference.tile_starts(200, 32, 0.5)) * len(inference.tile_starts(136, 32, 0.5)) == 96
  for batch_size in (5, 96):  # padded last batch, one batch: the same blended values
    batched = inference.sliding_window(apply_fn, VARIABLES, image, tile=32, overlap=0.5, batch_size=batch_size)
    np.testing.assert_allclose(batched, out, rtol=1e-5, atol=1e-5)


def test_a_window_wider_than_the_image_in_one_dimension_and_not_a_multiple_of_the_depth():
  """A 20x70 image under 30-pixel tiles without overlap: zero-padded to 30 rows, windows at columns 0,
  30 and 40; each tile is padded to 32 inside the model (a multiple of 2**depth) and cropped back.
  Where one window alone covers a pixel, the constant blend is that window's logits exactly."""
  image = _image(20, 70, seed=3)
  out = inference.sliding_window(apply_fn, VARIABLES, image, tile=30, overlap=0.0, blend='constant', batch_size=2)
  assert out.shape == (20, 70, 2) and inference.tile_starts(70, 30, 0.0) == [0, 30, 40]
  padded = np.pad(image, ((0, 10), (0, 0), (0, 0)))  # what the windows see: zeros below row 20

  def window(x):
    return np.asarray(DIRECT(VARIABLES, np.ascontiguousarray(padded[None, :, x : x + 30]))[0, :20])

  np.testing.assert_allclose(out[:, :30], window(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, 30:40], window(30)[:, :10], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, 40:60], (window(30)[:, 10:] + window(40)[:, :20]) / 2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, 60:], window(40)[:, 20:], rtol=1e-5, atol=1e-5)


def test_tile_layout_and_bad_arguments():
  assert inference.tile_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
  assert inference.tile_starts(20, 32, 0.5) == [0]
  weights = inference.tile_weights(16, 'gaussian')
  assert weights.max() == 1.0 and weights.min() > 0 and weights[0, 0] < weights[8, 8]
  with pytest.raises(ValueError, match='overlap=1.0 must be in'):
    inference.sliding_window(apply_fn, VARIABLES, _image(8, 8), tile=8, overlap=1.0)
  with pytest.raises(ValueError, match="blend='box' is not one of gaussian, constant"):
    inference.tile_weights(8, 'box')


def test_probabilities_and_classes():
  binary = np.array([[[0.0], [2.0]]])
  np.testing.assert_allclose(inference.probabilities(binary)[0, :, 0], [0.5, 1 / (1 + np.exp(-2))])
  assert inference.classes(binary).tolist() == [[0, 1]]
  multi = np.array([[[1.0, 3.0, 2.0]]])
  np.testing.assert_allclose(inference.probabilities(multi).sum(-1), 1.0, rtol=1e-6)
  assert inference.classes(multi).tolist() == [[1]]


VOLUME_CONFIG = models.ModelConfig(
  base_width=2, depth=2, residual=True, spatial_dims=3, pool_strides=((1, 2, 2), (2, 2, 2))
)
VOLUME_MODEL = models.UNet(VOLUME_CONFIG)
VOLUME_VARIABLES = VOLUME_MODEL.init(jax.random.key(0), jnp.zeros((1, 4, 8, 8, 1)), train=False)


def _volume_apply(variables, x):
  return VOLUME_MODEL.apply(variables, x, train=False)


def test_a_volume_larger_than_its_tile_is_covered_blended_and_batched():
  volume = np.random.default_rng(4).normal(size=(10, 40, 36, 1)).astype(np.float32)
  shapes = []

  def pointwise(variables, x):  # no context: any tiling must give back exactly its values
    shapes.append(x.shape)
    return 2 * x + 1

  for overlap in (0.0, 0.5, 0.75):
    out = inference.sliding_window(pointwise, {}, volume, tile=(4, 16, 12), overlap=overlap, batch_size=3)
    np.testing.assert_allclose(out, 2 * volume + 1, rtol=1e-6, atol=1e-6)
  assert set(shapes) == {(3, 4, 16, 12, 1)}  # device memory: one batch of tiles, never the volume
  # With the network, overlapping Gaussian tiles come closer to whole-volume inference than seams do.
  direct = np.asarray(jax.jit(_volume_apply)(VOLUME_VARIABLES, volume[None])[0])
  blended = inference.sliding_window(_volume_apply, VOLUME_VARIABLES, volume, tile=(8, 24, 24), overlap=0.75)
  seams = inference.sliding_window(
    _volume_apply, VOLUME_VARIABLES, volume, tile=(8, 24, 24), overlap=0.0, blend='constant'
  )
  assert np.abs(seams - direct).mean() > 1.5 * np.abs(blended - direct).mean()


def test_a_volume_tile_alone_is_direct_inference_and_flip_tta_averages_all_eight_flips():
  volume = np.random.default_rng(5).normal(size=(4, 8, 8, 1)).astype(np.float32)
  direct = np.asarray(jax.jit(_volume_apply)(VOLUME_VARIABLES, volume[None])[0])
  one = inference.sliding_window(_volume_apply, VOLUME_VARIABLES, volume, tile=(4, 8, 8))
  np.testing.assert_allclose(one, direct, rtol=1e-6, atol=1e-6)
  flips = []
  for count in range(4):
    for axes in itertools.combinations(range(3), count):
      flipped = np.ascontiguousarray(np.flip(volume, axes) if axes else volume)
      out = np.asarray(jax.jit(_volume_apply)(VOLUME_VARIABLES, flipped[None])[0])
      flips.append(np.flip(out, axes) if axes else out)
  assert len(flips) == 8
  tta = inference.sliding_window(_volume_apply, VOLUME_VARIABLES, volume, tile=(4, 8, 8), flip_tta=True)
  np.testing.assert_allclose(tta, np.mean(flips, 0), rtol=1e-5, atol=1e-5)


def test_volume_tile_weights_peak_at_the_centre_of_each_axis():
  weights = inference.tile_weights((4, 16, 8), 'gaussian', 3)
  assert weights.shape == (4, 16, 8) and weights.max() == 1.0 and weights.min() > 0
  centre = weights[1:3, 7:9, 3:5]
  assert (centre == centre.max()).all() and weights[0, 0, 0] == weights.min()
  # Each axis's Gaussian has sigma = its side / 8: the same fall-off at the same fraction of the side.
  np.testing.assert_allclose(
    weights[1, :, 3], np.repeat(weights[1, 7, ::1], 1)[3] * weights[1, :, 3] / weights[1, 7, 3]
  )
  np.testing.assert_array_equal(inference.tile_weights(16, 'gaussian'), inference.tile_weights((16, 16), 'gaussian'))
