"""Sliding-window inference for images of any size.

The image is covered by square tiles that overlap by `overlap` of their side; the model runs
on `batch_size` tiles at a time (one compiled program, the last batch padded), and the logits
are blended with per-pixel weights, a Gaussian centred on each tile (sigma = tile / 8, as in
nnU-Net, Isensee et al. 2021) or a constant. Device memory is bounded by the tile batch, not
the image; the host holds the blended logits and the weights (H x W x C floats).
Flip test-time augmentation averages the logits of the image and of its horizontal, vertical
and double flips (each flipped back).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

BLENDS = ('gaussian', 'constant')


def tile_weights(tile: int, blend: str) -> np.ndarray:
  """`[tile, tile]` float32 blending weights, max 1, strictly positive."""
  if blend == 'constant':
    return np.ones((tile, tile), np.float32)
  if blend != 'gaussian':
    raise ValueError(f"blend='{blend}' is not one of {', '.join(BLENDS)}")
  sigma = tile / 8
  axis = np.arange(tile, dtype=np.float64) - (tile - 1) / 2
  weights = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma**2))
  weights /= weights.max()
  return np.maximum(weights, weights[weights > 0].min()).astype(np.float32)


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
  """Start offsets covering `[0, size)` with tiles of `tile` (size >= tile), the last flush."""
  if size <= tile:
    return [0]
  stride = max(1, int(tile * (1 - overlap)))
  starts = list(range(0, size - tile + 1, stride))
  if starts[-1] != size - tile:
    starts.append(size - tile)
  return starts


def sliding_window(
  apply_fn: Callable[[dict, jax.Array], jax.Array],
  variables: dict,
  image: np.ndarray,
  *,
  tile: int,
  overlap: float = 0.5,
  batch_size: int = 4,
  blend: str = 'gaussian',
  flip_tta: bool = False,
  progress: bool = False,
  pad_value: np.ndarray | float = 0.0,
) -> np.ndarray:
  """Blended logits of a whole image.

  Args:
    apply_fn: `(variables, tiles [N, tile, tile, C_in]) -> logits [N, tile, tile, C]`, pure
      (e.g. `lambda v, x: model.apply(v, x, train=False)`); it is jitted here.
    variables: the model variables.
    image: `[H, W, C_in]` float32: model inputs, or pixels that `apply_fn` normalises; any H
      and W (smaller than `tile` is padded with `pad_value` and cropped back).
    tile: tile side in pixels.
    overlap: fraction of the tile shared by neighbours, in [0, 1).
    batch_size: tiles per model call (bounds device memory).
    blend: 'gaussian' | 'constant'.
    flip_tta: average over the 4 flips.
    progress: show a progress bar over tile batches.
    pad_value: per channel, what pads an image smaller than `tile` (0 for normalised inputs; for
      pixels that `apply_fn` normalises, the value that normalises to 0: `Normalization.neutral`).

  Returns:
    `[H, W, C]` float32 logits.
  """
  if not 0 <= overlap < 1:
    raise ValueError(f'overlap={overlap} must be in [0, 1)')
  if tile < 1 or batch_size < 1:
    raise ValueError(f'tile={tile} and batch_size={batch_size} must be positive')
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise ValueError(f'image has shape {image.shape}; sliding_window takes one [H, W, C] image')
  if not np.isfinite(image).all():
    raise ValueError(f'image holds {int((~np.isfinite(image)).sum())} non-finite values (NaN or inf); clean it first')
  height, width, channels = image.shape
  padded = image  # an image at least a tile on both sides is read in place
  if height < tile or width < tile:
    padded = np.empty((max(height, tile), max(width, tile), channels), np.float32)
    padded[...] = np.asarray(pad_value, np.float32)
    padded[:height, :width] = image
  full_h, full_w = padded.shape[:2]
  boxes = [(y, x) for y in tile_starts(full_h, tile, overlap) for x in tile_starts(full_w, tile, overlap)]
  weights = tile_weights(tile, blend)
  predict = _compiled(apply_fn, flip_tta)
  logits_sum = None
  weight_sum = np.zeros((full_h, full_w, 1), np.float32)
  batches = range(0, len(boxes), batch_size)
  for start in tqdm(batches, disable=not progress, unit='batch', leave=False):
    chunk = boxes[start : start + batch_size]
    tiles = np.zeros((batch_size, tile, tile, channels), np.float32)  # Padded: one compiled shape.
    for i, (y, x) in enumerate(chunk):
      tiles[i] = padded[y : y + tile, x : x + tile]
    out = np.asarray(predict(variables, tiles))
    if logits_sum is None:
      logits_sum = np.zeros((full_h, full_w, out.shape[-1]), np.float32)
    for i, (y, x) in enumerate(chunk):
      logits_sum[y : y + tile, x : x + tile] += out[i] * weights[..., None]
      weight_sum[y : y + tile, x : x + tile] += weights[..., None]
  logits_sum /= weight_sum  # in place: the blended logits are the largest array
  return logits_sum[:height, :width]


@functools.lru_cache(maxsize=8)
def _compiled(apply_fn, flip_tta: bool):
  """One jitted predictor per (apply_fn, flip_tta), reused across images: pass the same
  `apply_fn` object for every image to compile once."""

  def predict(variables, tiles):
    if not flip_tta:
      return apply_fn(variables, tiles)
    outputs = []
    for axes in ((), (2,), (1,), (1, 2)):  # none, horizontal, vertical, both
      flipped = jnp.flip(tiles, axes) if axes else tiles
      logits = apply_fn(variables, flipped)
      outputs.append(jnp.flip(logits, axes) if axes else logits)
    return jnp.mean(jnp.stack(outputs), axis=0)

  return jax.jit(predict)


def probabilities(logits: np.ndarray) -> np.ndarray:
  """Sigmoid (1 channel) or softmax (C channels) of `[..., C]` logits."""
  logits = np.asarray(logits, np.float32)
  if logits.shape[-1] == 1:
    return 1 / (1 + np.exp(-logits))
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  return shifted / shifted.sum(-1, keepdims=True)


def classes(logits: np.ndarray) -> np.ndarray:
  """Class ids `[H, W]` uint8 (binary: logit > 0)."""
  logits = np.asarray(logits)
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(np.uint8)
  return np.argmax(logits, -1).astype(np.uint8)
