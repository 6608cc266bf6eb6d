"""Segmentation metrics.

In the jitted steps: per-image confusion counts (`confusion`), from which Dice, IoU and pixel
accuracy follow. On the host at evaluation: boundary F1, HD95 and surface Dice from predicted
and true masks; HD95 and surface Dice take 2D images or 3D volumes and a voxel spacing.

Conventions for empty masks (per image and class): Dice and IoU are 1 when prediction and
truth are both empty and 0 when exactly one is; boundary F1 and surface Dice likewise; HD95 is
0 when both are empty and the image diagonal (the largest possible distance, in the units of
the spacing) when exactly one is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage, spatial


def predict(logits: jax.Array) -> jax.Array:
  """Class ids `[B, *spatial]` int32 from logits `[B, *spatial, C]` (C = 1: sigmoid > 0.5)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def confusion(
  predictions: jax.Array, masks: jax.Array, num_outputs: int, weights: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Per-image, per-class counts (jax arrays in a jitted step; numpy in, numpy out on the host).

  Args:
    predictions: `[B, H, W]` class ids (volumes: `[B, D, H, W]`).
    masks: class ids, shaped as `predictions`.
    num_outputs: the model's output channels (1 = binary, foreground is class 1).
    weights: None, or `[B, *spatial]` in {0, 1}: pixels of weight 0 (a patch's padding) are not counted.

  Returns:
    `tp`, `fp`, `fn`: `[B, K]` float32 (K = 1 for binary, else num_outputs); `correct`: `[B]`
    the fraction of (counted) pixels equal to the mask.
  """
  xp = np if isinstance(predictions, np.ndarray) and isinstance(masks, np.ndarray) else jnp  # host: no device copy
  classes = xp.array([1]) if num_outputs == 1 else xp.arange(num_outputs)
  pred = predictions[..., None] == classes
  true = masks[..., None] == classes
  axes = tuple(range(1, predictions.ndim))
  if weights is not None:
    counted = weights > 0
    pred, true = pred & counted[..., None], true & counted[..., None]
    right = (predictions == masks) & counted
    correct = xp.sum(right, axes, dtype=xp.float32) / xp.maximum(xp.sum(counted, axes, dtype=xp.float32), 1.0)
  else:
    correct = xp.mean(predictions == masks, axis=axes, dtype=xp.float32)
  return {
    'tp': xp.sum(pred & true, axes, dtype=xp.float32),
    'fp': xp.sum(pred & ~true, axes, dtype=xp.float32),
    'fn': xp.sum(~pred & true, axes, dtype=xp.float32),
    'correct': correct,
  }


def class_scores(counts: dict) -> dict:
  """Per-image, per-class Dice and IoU `[B, K]` (empty convention above).

  Works in a jitted step (jax arrays in, jax arrays out) and on the host (numpy in, numpy out).
  """
  xp = np if isinstance(counts['tp'], np.ndarray) else jnp
  tp, fp, fn = counts['tp'], counts['fp'], counts['fn']
  empty = (tp + fp + fn) == 0
  return {
    'dice': xp.where(empty, 1.0, 2 * tp / xp.maximum(2 * tp + fp + fn, 1.0)),
    'iou': xp.where(empty, 1.0, tp / xp.maximum(tp + fp + fn, 1.0)),
  }


def scores(counts: dict, valid: jax.Array | None = None) -> dict:
  """Mean per-image Dice, IoU and pixel accuracy over valid images (classes averaged), in a step."""
  per_class = class_scores(counts)
  dice, iou = per_class['dice'].mean(-1), per_class['iou'].mean(-1)
  valid = jnp.ones_like(dice) if valid is None else valid
  total = jnp.maximum(valid.sum(), 1.0)
  return {
    'dice': (dice * valid).sum() / total,
    'iou': (iou * valid).sum() / total,
    'accuracy': (counts['correct'] * valid).sum() / total,
  }


def _boundary(mask: np.ndarray) -> np.ndarray:
  """Pixels of `mask` with a 4-neighbour outside it (image borders count as outside)."""
  return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_f1(prediction: np.ndarray, truth: np.ndarray, tolerance: float = 2.0) -> float:
  """Boundary F1 of two binary masks (2D or 3D): boundary pixels matched within `tolerance` pixels.

  Precision is the fraction of predicted boundary pixels within `tolerance` (Euclidean) of a
  true boundary pixel; recall the converse (Csurka et al., BMVC 2013).
  """
  pred_edge, true_edge = _boundary(prediction.astype(bool)), _boundary(truth.astype(bool))
  if not pred_edge.any() and not true_edge.any():
    return 1.0
  if not pred_edge.any() or not true_edge.any():
    return 0.0
  # Within `tolerance` of an edge pixel is inside the edge dilated by a disk of that radius: boolean
  # images instead of float64 distance maps (a 4096x4096 image scores in bounded memory).
  reach = np.arange(-int(tolerance), int(tolerance) + 1)
  disk = sum(np.meshgrid(*[reach**2] * prediction.ndim, indexing='ij')) <= tolerance**2  # a ball in 3D
  precision = float(ndimage.binary_dilation(true_edge, disk)[pred_edge].mean())
  recall = float(ndimage.binary_dilation(pred_edge, disk)[true_edge].mean())
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _spacing(shape: tuple[int, ...], spacing) -> np.ndarray:
  if spacing is None:
    return np.ones(len(shape))
  spacing = np.asarray(spacing, np.float64)
  if spacing.shape != (len(shape),) or not (spacing > 0).all():
    raise ValueError(f'spacing {spacing.tolist()} must give one positive size per axis of the {len(shape)}D mask')
  return spacing


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing=None) -> float:
  """95th percentile of the symmetric boundary-to-boundary distances (2D or 3D).

  Boundary voxels are those with a face neighbour outside the mask, and the distances are
  between their centres, in the units of `spacing` (one size per axis; None: pixels), as
  MedPy's `hd95(voxelspacing=...)` computes them.
  """
  spacing = _spacing(prediction.shape, spacing)
  pred_edge, true_edge = _boundary(prediction.astype(bool)), _boundary(truth.astype(bool))
  if not pred_edge.any() and not true_edge.any():
    return 0.0
  if not pred_edge.any() or not true_edge.any():
    return float(np.linalg.norm(np.asarray(prediction.shape) * spacing))
  # Nearest-neighbour distances between the two sets of edge pixels: memory in edge pixels, not in
  # image pixels (the same exact Euclidean distances as a distance transform's).
  pred_points, true_points = np.argwhere(pred_edge) * spacing, np.argwhere(true_edge) * spacing
  distances = np.concatenate(
    [spatial.cKDTree(true_points).query(pred_points)[0], spatial.cKDTree(pred_points).query(true_points)[0]]
  )
  return float(np.percentile(distances, 95))


def _surface(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The surface of a 2D or 3D mask on the grid of voxel corners: a boolean grid one larger per
  axis (corners whose 2**n voxels are neither all inside nor all outside) and each corner's
  contour length (2D) or surface area (3D) in the units of `spacing`."""
  from surface_distance import lookup_tables  # DeepMind's marching-squares/cubes element sizes

  if mask.ndim == 2:
    kernel, table = (
      lookup_tables.ENCODE_NEIGHBOURHOOD_2D_KERNEL,
      lookup_tables.create_table_neighbour_code_to_contour_length,
    )
  else:
    kernel, table = (
      lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL,
      lookup_tables.create_table_neighbour_code_to_surface_area,
    )
  padded = np.pad(mask.astype(np.uint8), [(1, 1)] * mask.ndim)
  # The code of corner c is the 2**n voxels around it; correlate's 2-wide kernel is centred on its
  # second element, so position i + 1 of the padded grid sees voxels i and i + 1: corner i + 1.
  codes = ndimage.correlate(padded, kernel, mode='constant', cval=0)[(slice(1, None),) * mask.ndim]
  full = 2 ** (2**mask.ndim) - 1
  return (codes != 0) & (codes != full), table(spacing)[codes]


def surface_dice(prediction: np.ndarray, truth: np.ndarray, tolerance: float, spacing=None) -> float:
  """Surface Dice at `tolerance` (the normalised surface distance) of two 2D or 3D binary masks.

  The share of both surfaces, by contour length (2D) or area (3D), that lies within
  `tolerance` of the other surface, in the units of `spacing` (one size per axis; None:
  pixels). Surfaces are marching squares/cubes through the voxel corners, with the element
  sizes of DeepMind's `surface-distance` (Nikolov et al., JMIR 2021), whose
  `compute_surface_dice_at_tolerance` this equals; both masks empty give 1, one empty 0.
  """
  if prediction.shape != truth.shape or prediction.ndim not in (2, 3):
    raise ValueError(f'surface_dice takes two 2D or 3D masks of one shape; got {prediction.shape} and {truth.shape}')
  spacing = _spacing(prediction.shape, spacing)
  pred_edge, pred_size = _surface(prediction.astype(bool), spacing)
  true_edge, true_size = _surface(truth.astype(bool), spacing)
  if not pred_edge.any() or not true_edge.any():
    return float(pred_edge.any() == true_edge.any())
  to_truth = ndimage.distance_transform_edt(~true_edge, sampling=spacing)[pred_edge]
  to_prediction = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)[true_edge]
  pred_size, true_size = pred_size[pred_edge], true_size[true_edge]
  within = pred_size[to_truth <= tolerance].sum() + true_size[to_prediction <= tolerance].sum()
  return float(within / (pred_size.sum() + true_size.sum()))


def boundary_scores(
  predictions: np.ndarray, masks: np.ndarray, num_outputs: int, tolerance: float = 2.0, spacing=None
) -> dict:
  """Per-image boundary F1 and HD95 `[B]` each, classes averaged (foreground for binary).

  With `spacing` (volumes: `[B, 3]`, one voxel size per image) HD95 is in those units and
  `surface_dice` at `tolerance` in the same units is added; boundary F1 stays in voxels.
  """
  classes = [1] if num_outputs == 1 else range(num_outputs)
  pairs = list(zip(predictions, masks, strict=True))
  sizes = [None] * len(pairs) if spacing is None else list(spacing)
  f1 = [[boundary_f1(p == c, m == c, tolerance) for c in classes] for p, m in pairs]
  hd = [[hd95(p == c, m == c, s) for c in classes] for (p, m), s in zip(pairs, sizes, strict=True)]
  scores = {'boundary_f1': np.mean(f1, -1), 'hd95': np.mean(hd, -1)}
  if spacing is not None:
    sd = [[surface_dice(p == c, m == c, tolerance, s) for c in classes] for (p, m), s in zip(pairs, sizes, strict=True)]
    scores['surface_dice'] = np.mean(sd, -1)
  return scores
