"""The best single global intensity threshold: the floor that a segmentation task must beat."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def best_threshold_dice(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, str]:
  """Dice of the best single threshold on one intensity, chosen with the labels (an oracle).

  Every (image, mask) pair is pooled; the thresholded quantity is tried as the grey level
  (channel mean) and as each channel, in both directions (`> t` and `<= t`), for every t.

  Args:
    pairs: `(image [H, W, C] uint8, mask [H, W] bool or int; nonzero is foreground)`.

  Returns:
    The best Dice over all thresholds, channels and directions, and a description of it.
  """
  hist_fg, hist_bg = None, None
  for image, mask in pairs:
    planes = np.concatenate([image.mean(-1, keepdims=True).round(), image], -1).astype(np.int64)
    fg = np.asarray(mask).astype(bool)
    if hist_fg is None:
      hist_fg = np.zeros((planes.shape[-1], 256))
      hist_bg = np.zeros((planes.shape[-1], 256))
    for c in range(planes.shape[-1]):
      hist_fg[c] += np.bincount(planes[..., c][fg], minlength=256)
      hist_bg[c] += np.bincount(planes[..., c][~fg], minlength=256)
  total_fg = hist_fg.sum(-1, keepdims=True)
  # Predict foreground for value > t: TP and FP are upper tails.
  tp_above = total_fg - np.cumsum(hist_fg, -1)
  fp_above = hist_bg.sum(-1, keepdims=True) - np.cumsum(hist_bg, -1)
  tp_below, fp_below = total_fg - tp_above, np.cumsum(hist_bg, -1)
  best, where = 0.0, ''
  for direction, tp, fp in (('>', tp_above, fp_above), ('<=', tp_below, fp_below)):
    dice = 2 * tp / np.maximum(tp + fp + total_fg, 1)
    c, t = np.unravel_index(np.argmax(dice), dice.shape)
    if dice[c, t] > best:
      best, where = float(dice[c, t]), f'{"grey" if c == 0 else f"channel {c - 1}"} {direction} {t}'
  return best, where
