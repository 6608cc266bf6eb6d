"""Segmentation metrics.

In the jitted steps: per-image confusion counts (`confusion`), from which Dice, IoU and pixel
accuracy follow. On the host at evaluation: boundary F1 and HD95 from predicted and true masks.

Conventions for empty masks (per image and class): Dice and IoU are 1 when prediction and
truth are both empty and 0 when exactly one is; boundary F1 likewise; HD95 is 0 when both
are empty and the image diagonal (the largest possible distance) when exactly one is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage


def predict(logits: jax.Array) -> jax.Array:
  """Class ids `[B, H, W]` int32 from logits `[B, H, W, C]` (C = 1: sigmoid > 0.5)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def confusion(predictions: jax.Array, masks: jax.Array, num_outputs: int) -> dict[str, jax.Array]:
  """Per-image, per-class counts.

  Args:
    predictions: `[B, H, W]` class ids.
    masks: `[B, H, W]` class ids.
    num_outputs: the model's output channels (1 = binary, foreground is class 1).

  Returns:
    `tp`, `fp`, `fn`: `[B, K]` float32 (K = 1 for binary, else num_outputs); `correct`: `[B]`
    pixels equal to the mask.
  """
  classes = jnp.array([1]) if num_outputs == 1 else jnp.arange(num_outputs)
  pred = predictions[..., None] == classes
  true = masks[..., None] == classes
  axes = (1, 2)
  return {
    'tp': jnp.sum(pred & true, axes, dtype=jnp.float32),
    'fp': jnp.sum(pred & ~true, axes, dtype=jnp.float32),
    'fn': jnp.sum(~pred & true, axes, dtype=jnp.float32),
    'correct': jnp.mean(predictions == masks, axis=(1, 2), dtype=jnp.float32),
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
  """Boundary F1 of two binary masks: boundary pixels matched within `tolerance` pixels.

  Precision is the fraction of predicted boundary pixels within `tolerance` (Euclidean) of a
  true boundary pixel; recall the converse (Csurka et al., BMVC 2013).
  """
  pred_edge, true_edge = _boundary(prediction.astype(bool)), _boundary(truth.astype(bool))
  if not pred_edge.any() and not true_edge.any():
    return 1.0
  if not pred_edge.any() or not true_edge.any():
    return 0.0
  to_true = ndimage.distance_transform_edt(~true_edge)
  to_pred = ndimage.distance_transform_edt(~pred_edge)
  precision = float((to_true[pred_edge] <= tolerance).mean())
  recall = float((to_pred[true_edge] <= tolerance).mean())
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def hd95(prediction: np.ndarray, truth: np.ndarray) -> float:
  """95th percentile of the symmetric boundary-to-boundary distances, in pixels."""
  pred_edge, true_edge = _boundary(prediction.astype(bool)), _boundary(truth.astype(bool))
  if not pred_edge.any() and not true_edge.any():
    return 0.0
  if not pred_edge.any() or not true_edge.any():
    return float(np.hypot(*prediction.shape))
  distances = np.concatenate(
    [ndimage.distance_transform_edt(~true_edge)[pred_edge], ndimage.distance_transform_edt(~pred_edge)[true_edge]]
  )
  return float(np.percentile(distances, 95))


def boundary_scores(predictions: np.ndarray, masks: np.ndarray, num_outputs: int, tolerance: float = 2.0) -> dict:
  """Per-image boundary F1 and HD95 `[B]` each, classes averaged (foreground for binary)."""
  classes = [1] if num_outputs == 1 else range(num_outputs)
  f1 = [[boundary_f1(p == c, m == c, tolerance) for c in classes] for p, m in zip(predictions, masks, strict=True)]
  hd = [[hd95(p == c, m == c) for c in classes] for p, m in zip(predictions, masks, strict=True)]
  return {'boundary_f1': np.mean(f1, -1), 'hd95': np.mean(hd, -1)}
