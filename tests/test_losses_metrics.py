"""Losses and metrics against hand-computed values, including empty-mask conventions."""

import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import losses, metrics


def test_binary_loss_is_bce_plus_soft_dice():
  logits = jnp.array([[[[2.0], [-1.0]], [[0.5], [-3.0]]]])  # [1, 2, 2, 1]
  masks = jnp.array([[[1, 0], [0, 0]]])
  p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5, -3.0])))
  t = np.array([1.0, 0, 0, 0])
  bce = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
  dice = 1 - (np.sum(p * t) + 1) / ((np.sum(p) + np.sum(t)) / 2 + 1)  # optax: smooth 1 on I and (P+T)/2
  got = losses.per_example_loss(logits, masks, losses.LossWeights(1.0, 1.0))
  np.testing.assert_allclose(got, [bce + dice], rtol=1e-5)
  only_ce = losses.per_example_loss(logits, masks, losses.LossWeights(1.0, 0.0))
  np.testing.assert_allclose(only_ce, [bce], rtol=1e-5)


def test_invalid_examples_do_not_count():
  logits = jnp.zeros((2, 4, 4, 3)).at[1].set(5.0)
  masks = jnp.zeros((2, 4, 4), jnp.int32)
  weights = losses.LossWeights(1.0, 0.0)
  first = losses.segmentation_loss(logits[:1], masks[:1], jnp.ones(1), weights)
  both_one_valid = losses.segmentation_loss(logits, masks, jnp.array([1.0, 0.0]), weights)
  np.testing.assert_allclose(first, both_one_valid)
  np.testing.assert_allclose(first, np.log(3), rtol=1e-6)  # uniform softmax over 3 classes


def test_confusion_and_scores_by_hand():
  predictions = jnp.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
  masks = jnp.array([[[1, 0], [1, 0]], [[0, 0], [0, 0]]])
  counts = metrics.confusion(predictions, masks, 1)
  np.testing.assert_array_equal(counts['tp'][:, 0], [1, 0])
  np.testing.assert_array_equal(counts['fp'][:, 0], [1, 0])
  np.testing.assert_array_equal(counts['fn'][:, 0], [1, 0])
  per_class = metrics.class_scores(counts)
  np.testing.assert_allclose(per_class['dice'][:, 0], [0.5, 1.0])  # image 2: both empty -> 1
  np.testing.assert_allclose(per_class['iou'][:, 0], [1 / 3, 1.0])
  mean = metrics.scores(counts, jnp.array([1.0, 0.0]))
  np.testing.assert_allclose([mean['dice'], mean['iou'], mean['accuracy']], [0.5, 1 / 3, 0.5], rtol=1e-6)


def test_one_empty_mask_scores_zero():
  counts = metrics.confusion(jnp.ones((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32), 1)
  assert metrics.class_scores(counts)['dice'][0, 0] == 0.0


def test_boundary_f1_and_hd95_known_cases():
  truth = np.zeros((20, 20), bool)
  truth[5:15, 5:15] = True
  assert metrics.boundary_f1(truth, truth) == 1.0 and metrics.hd95(truth, truth) == 0.0
  shifted = np.roll(truth, 3, axis=1)  # every boundary pixel moves 3 px (some much less)
  assert metrics.boundary_f1(shifted, truth, tolerance=3.0) == 1.0
  assert metrics.boundary_f1(shifted, truth, tolerance=1.0) < 1.0
  assert metrics.hd95(shifted, truth) == pytest.approx(3.0)
  empty = np.zeros_like(truth)
  assert metrics.boundary_f1(empty, empty) == 1.0 and metrics.hd95(empty, empty) == 0.0
  assert metrics.boundary_f1(empty, truth) == 0.0
  assert metrics.hd95(empty, truth) == pytest.approx(np.hypot(20, 20))


@pytest.mark.parametrize('tolerance', [0.0, 1.0, 1.5, 2.0, 3.0])
def test_boundary_scores_equal_their_distance_transform_definitions(tolerance):
  """Boundary F1 (dilation by a disk) and HD95 (nearest edge pixels) computed without image-sized
  distance maps equal the definitions written with scipy's exact Euclidean distance transform."""
  from scipy import ndimage

  rng = np.random.default_rng(int(tolerance * 10))
  for _ in range(5):
    prediction = ndimage.binary_opening(rng.random((61, 47)) < 0.5)
    truth = ndimage.binary_opening(rng.random((61, 47)) < 0.5)
    edge_p = prediction & ~ndimage.binary_erosion(prediction, border_value=0)
    edge_t = truth & ~ndimage.binary_erosion(truth, border_value=0)
    to_t, to_p = ndimage.distance_transform_edt(~edge_t), ndimage.distance_transform_edt(~edge_p)
    precision, recall = (to_t[edge_p] <= tolerance).mean(), (to_p[edge_t] <= tolerance).mean()
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    assert metrics.boundary_f1(prediction, truth, tolerance) == pytest.approx(f1, abs=1e-12)
    distances = np.concatenate([to_t[edge_p], to_p[edge_t]])
    assert metrics.hd95(prediction, truth) == pytest.approx(np.percentile(distances, 95), abs=1e-12)
