"""Sliding-window inference for images and volumes of any size.

The image (or volume) is covered by tiles that overlap by `overlap` of their side; the model
runs on `batch_size` tiles at a time (one compiled program, the last batch padded), and the
logits are blended with per-pixel weights, a Gaussian centred on each tile (sigma = tile / 8 per
axis, as in nnU-Net, Isensee et al. 2021) or a constant. Device memory is bounded by the tile
batch, not the image; the host holds the blended logits and the weights (pixels x C floats),
as MONAI's buffered sliding window accumulates on the host. Flip test-time augmentation averages
the logits of every combination of flips of the spatial axes (4 for an image, 8 for a volume),
each flipped back.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

BLENDS = ('gaussian', 'constant')


def _sides(tile: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  return (int(tile),) * ndim if np.ndim(tile) == 0 else tuple(int(t) for t in tile)


def tile_weights(tile: int | Sequence[int], blend: str, ndim: int = 2) -> np.ndarray:
  """Blending weights of one tile, `[tile] * ndim` (or the sides of a tuple `tile`) float32, max 1,
  strictly positive."""
  sides = _sides(tile, ndim)
  if blend == 'constant':
    return np.ones(sides, np.float32)
  if blend != 'gaussian':
    raise ValueError(f"blend='{blend}' is not one of {', '.join(BLENDS)}")
  sigma = sides[0] / 8
  squared = 0.0
  for axis, side in enumerate(sides):  # each axis's offsets in units of the first axis's sigma
    offsets = (np.arange(side, dtype=np.float64) - (side - 1) / 2) * (sides[0] / side)
    squared = squared + (offsets**2).reshape([-1 if a == axis else 1 for a in range(len(sides))])
  weights = np.exp(-squared / (2 * sigma**2))
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
  tile: int | Sequence[int],
  overlap: float = 0.5,
  batch_size: int = 4,
  blend: str = 'gaussian',
  flip_tta: bool = False,
  progress: bool = False,
  pad_value: np.ndarray | float = 0.0,
) -> np.ndarray:
  """Blended logits of a whole image or volume.

  Args:
    apply_fn: `(variables, tiles [N, *tile, C_in]) -> logits [N, *tile, C]`, pure (e.g.
      `lambda v, x: model.apply(v, x, train=False)`); it is jitted here.
    variables: the model variables.
    image: `[H, W, C_in]` or `[D, H, W, C_in]` float32: model inputs, or pixels that `apply_fn`
      normalises; any size (an axis shorter than the tile is padded with `pad_value` and cropped back).
    tile: the tile's side in pixels, or one side per spatial axis.
    overlap: fraction of the tile shared by neighbours, in [0, 1).
    batch_size: tiles per model call (bounds device memory).
    blend: 'gaussian' | 'constant'.
    flip_tta: average over every combination of flipped spatial axes.
    progress: show a progress bar over tile batches.
    pad_value: per channel, what pads an image smaller than `tile` (0 for normalised inputs; for
      pixels that `apply_fn` normalises, the value that normalises to 0: `Normalization.neutral`).

  Returns:
    `[*spatial, C]` float32 logits.
  """
  if not 0 <= overlap < 1:
    raise ValueError(f'overlap={overlap} must be in [0, 1)')
  image = np.asarray(image, np.float32)
  if image.ndim not in (3, 4):
    raise ValueError(f'image has shape {image.shape}; sliding_window takes one [H, W, C] image or [D, H, W, C] volume')
  spatial, channels = image.shape[:-1], image.shape[-1]
  sides = _sides(tile, len(spatial))
  if len(sides) != len(spatial) or min(sides) < 1 or batch_size < 1:
    raise ValueError(f'tile={tile} and batch_size={batch_size} must be positive, one side per axis of {spatial}')
  if not np.isfinite(image).all():
    raise ValueError(f'image holds {int((~np.isfinite(image)).sum())} non-finite values (NaN or inf); clean it first')
  padded = image  # an image at least a tile along every axis is read in place
  if any(n < t for n, t in zip(spatial, sides, strict=True)):
    padded = np.empty((*(max(n, t) for n, t in zip(spatial, sides, strict=True)), channels), np.float32)
    padded[...] = np.asarray(pad_value, np.float32)
    padded[tuple(slice(0, n) for n in spatial)] = image
  full = padded.shape[:-1]
  starts = [tile_starts(n, t, overlap) for n, t in zip(full, sides, strict=True)]
  boxes = [tuple(slice(s, s + t) for s, t in zip(corner, sides, strict=True)) for corner in itertools.product(*starts)]
  weights = tile_weights(sides, blend, len(sides))[..., None]
  predict = _compiled(apply_fn, flip_tta)
  logits_sum = None
  weight_sum = np.zeros((*full, 1), np.float32)
  batches = range(0, len(boxes), batch_size)
  for start in tqdm(batches, disable=not progress, unit='batch', leave=False):
    chunk = boxes[start : start + batch_size]
    tiles = np.zeros((batch_size, *sides, channels), np.float32)  # Padded: one compiled shape.
    for i, box in enumerate(chunk):
      tiles[i] = padded[box]
    out = np.asarray(predict(variables, tiles))
    if logits_sum is None:
      logits_sum = np.zeros((*full, out.shape[-1]), np.float32)
    for i, box in enumerate(chunk):
      logits_sum[box] += out[i] * weights
      weight_sum[box] += weights
  logits_sum /= weight_sum  # in place: the blended logits are the largest array
  return logits_sum[tuple(slice(0, n) for n in spatial)]


@functools.lru_cache(maxsize=8)
def _compiled(apply_fn, flip_tta: bool):
  """One jitted predictor per (apply_fn, flip_tta), reused across images: pass the same
  `apply_fn` object for every image to compile once."""

  def predict(variables, tiles):
    if not flip_tta:
      return apply_fn(variables, tiles)
    outputs = []
    spatial = range(1, tiles.ndim - 1)
    # none, then each combination: for an image horizontal, vertical, both (as before volumes)
    combos = [axes for count in range(len(spatial) + 1) for axes in itertools.combinations(reversed(spatial), count)]
    for axes in combos:
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
  """Class ids `[*spatial]` uint8 (binary: logit > 0)."""
  logits = np.asarray(logits)
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(np.uint8)
  return np.argmax(logits, -1).astype(np.uint8)
