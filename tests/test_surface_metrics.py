"""Surface Dice and HD95 in 2D and 3D with voxel spacing, against the field's reference implementations.

The oracles are DeepMind's `surface-distance` (`compute_surface_dice_at_tolerance`) and MedPy's
`hd95(voxelspacing=...)`, each run on the same random masks with anisotropic spacing.
"""

import numpy as np
import pytest
import surface_distance
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from resunet_jax import metrics


def _blobs(rng, shape, count=3):
  """A mask of `count` random smoothed blobs: surfaces with every neighbourhood case, not only planes."""
  noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(0.8, 2.0))
  return noise > np.quantile(noise, 1 - rng.uniform(0.1, 0.4)) if count else np.zeros(shape, bool)


def _pairs(ndim, count, seed):
  rng = np.random.default_rng(seed)
  for _ in range(count):
    shape = tuple(int(n) for n in rng.integers(6, 28 if ndim == 2 else 14, size=ndim))
    truth = _blobs(rng, shape)
    prediction = truth ^ _blobs(rng, shape) if rng.random() < 0.5 else _blobs(rng, shape)  # near and far
    spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, size=ndim))
    yield prediction, truth, spacing, float(rng.uniform(0.0, 4.0))


def _reference_surface_dice(prediction, truth, spacing, tolerance, monkeypatch):
  monkeypatch.setattr(np, 'Inf', np.inf, raising=False)  # the package predates NumPy 2, which dropped np.Inf
  distances = surface_distance.compute_surface_distances(truth, prediction, spacing)
  return surface_distance.compute_surface_dice_at_tolerance(distances, tolerance)


@pytest.mark.parametrize('ndim', [2, 3])
def test_surface_dice_equals_deepminds_on_random_masks_with_anisotropic_spacing(ndim, monkeypatch):
  for prediction, truth, spacing, tolerance in _pairs(ndim, 30, seed=ndim):
    expected = _reference_surface_dice(prediction, truth, spacing, tolerance, monkeypatch)
    assert metrics.surface_dice(prediction, truth, tolerance, spacing) == pytest.approx(expected, abs=1e-6)


def test_surface_dice_of_an_empty_mask_is_zero_and_of_two_is_one(monkeypatch):
  truth = np.zeros((9, 8, 7), bool)
  truth[2:6, 3:7, 1:4] = True
  empty = np.zeros_like(truth)
  spacing = (2.5, 0.7, 1.0)
  assert (
    metrics.surface_dice(empty, truth, 1.0, spacing)
    == _reference_surface_dice(empty, truth, spacing, 1.0, monkeypatch)
    == 0
  )
  assert metrics.surface_dice(truth, empty, 1.0, spacing) == 0
  assert metrics.surface_dice(empty, empty, 1.0, spacing) == 1  # the package gives 0/0 here
  assert metrics.surface_dice(truth, truth, 0.0, spacing) == pytest.approx(1.0)


def test_a_tolerance_counts_a_shifted_surface_once_it_reaches_the_shift():
  truth = np.zeros((20, 20), bool)
  truth[5:15, 5:15] = True
  shifted = np.roll(truth, 2, axis=0)  # every point of the rows moved 2 x 1.5 = 3 units
  spacing = (1.5, 1.0)
  assert metrics.surface_dice(shifted, truth, 3.0, spacing) == pytest.approx(1.0)
  assert metrics.surface_dice(shifted, truth, 2.9, spacing) < 1.0


@pytest.mark.parametrize('ndim', [2, 3])
def test_hd95_with_spacing_equals_medpys(ndim):
  for prediction, truth, spacing, _ in _pairs(ndim, 25, seed=10 + ndim):
    if not prediction.any() or not truth.any():
      continue  # MedPy raises on an empty mask; ours gives the diagonal (below)
    expected = medpy_binary.hd95(prediction, truth, voxelspacing=spacing)
    assert metrics.hd95(prediction, truth, spacing) == pytest.approx(expected, rel=1e-9)


def test_hd95_of_an_empty_prediction_is_the_diagonal_in_the_units_of_the_spacing():
  truth = np.zeros((4, 6, 8), bool)
  truth[1, 2, 3] = True
  assert metrics.hd95(np.zeros_like(truth), truth, (2.0, 1.0, 0.5)) == pytest.approx(np.sqrt(8**2 + 6**2 + 4**2))


def test_a_spacing_of_the_wrong_length_is_refused():
  with pytest.raises(ValueError, match='one positive size per axis'):
    metrics.surface_dice(np.ones((4, 4), bool), np.ones((4, 4), bool), 1.0, (1.0, 1.0, 1.0))
