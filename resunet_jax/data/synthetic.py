"""Procedural images and masks for the embedded datasets (numpy + Pillow, deterministic).

Each `render_*` function is pure in its `rng`: the builders seed one generator per example
from (dataset seed, split, index), so a dataset is the same on every machine.

Both tasks are built so that intensity alone does not solve them (the best single global
threshold stays below a Dice of 0.5; `tests/data/test_synthetic.py` measures it) and so that
resolution matters (1-2 px structures are always present).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


def smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
  """Low-frequency noise in [0, 1]: a `cells` x `cells` random grid upsampled bicubically.

  Returns:
    `[size, size, channels]` float32.
  """
  grid = rng.random((channels, cells, cells)).astype(np.float32)
  planes = [np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC)) for g in grid]
  return np.clip(np.stack(planes, -1), 0.0, 1.0)


def _curve(rng: np.random.Generator, start: np.ndarray, heading: float, size: int, steps: int) -> list[tuple]:
  """A random smooth polyline: a walk whose heading drifts slowly."""
  points, position = [tuple(start)], start.astype(np.float64)
  step = size / 24
  turn = 0.0
  for _ in range(steps):
    turn = 0.8 * turn + rng.normal(0.0, 0.12)
    heading += turn
    position = position + step * np.array([np.cos(heading), np.sin(heading)])
    points.append(tuple(position))
    if not (-0.2 * size < position[0] < 1.2 * size and -0.2 * size < position[1] < 1.2 * size):
      break
  return points


def render_roads(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """An aerial-like tile with a road network (the binary task of Zhang et al. 2018).

  Roads are smooth curves 1-5 px wide that cross and branch, in asphalt greys; tree crowns
  occlude parts of them (the mask keeps the road, as road ground truth does); buildings and
  parking lots in the same greys, and field texture, are distractors.

  Returns:
    image `[size, size, 3]` uint8 and mask `[size, size]` uint8 in {0, 1}.
  """
  # Fields: a low-frequency mix of two land colours plus texture.
  land_a, land_b = rng.uniform([60, 80, 40], [110, 130, 80]), rng.uniform([110, 100, 70], [170, 150, 110])
  mix = smooth_noise(rng, size, 4)
  image = land_a * (1 - mix) + land_b * mix + 25 * (smooth_noise(rng, size, 24, 3) - 0.5)
  road_grey = rng.uniform(95, 150)

  def grey(spread):
    return tuple(int(v) for v in np.clip(road_grey + rng.normal(0, spread, 3), 0, 255))

  canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  # Distractors: buildings and lots with roofs in the road's greys, covering more area than roads.
  for _ in range(rng.integers(5, 10)):
    x, y = rng.uniform(0, size, 2)
    w, h = rng.uniform(size / 14, size / 4, 2)
    draw.rectangle([x, y, x + w, y + h], fill=grey(10))

  mask = Image.new('L', (size, size), 0)
  mask_draw = ImageDraw.Draw(mask)
  roads = []
  for i in range(rng.integers(2, 5)):
    edge = rng.integers(4)
    start = rng.uniform(0, size, 2)
    start[edge % 2] = 0 if edge < 2 else size
    heading = np.arctan2(size / 2 - start[1], size / 2 - start[0]) + rng.normal(0, 0.5)
    width = 1 if i == 0 else int(rng.integers(1, 6))  # Always one 1-px road.
    roads.append((_curve(rng, start, heading, size, 40), width))
  for points, width in list(roads):  # Branches leave existing roads.
    if len(points) > 4 and rng.random() < 0.7:
      origin = np.array(points[rng.integers(1, len(points) - 1)])
      roads.append((_curve(rng, origin, rng.uniform(0, 2 * np.pi), size, 20), max(1, width - 1)))
  for points, width in roads:
    colour = grey(6)
    draw.line(points, fill=colour, width=width, joint='curve')
    mask_draw.line(points, fill=1, width=width, joint='curve')
  # Tree crowns: occlude roads and fields alike.
  for _ in range(rng.integers(4, 12)):
    x, y = rng.uniform(0, size, 2)
    r = rng.uniform(1.5, 4.5)
    green = tuple(int(v) for v in rng.uniform([30, 60, 20], [70, 110, 50]))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=green)

  image = np.asarray(canvas, np.float32)
  image += rng.normal(0, 10, image.shape)  # Sensor noise.
  return np.clip(image, 0, 255).astype(np.uint8), np.asarray(mask, np.uint8)


def _cell_shapes(rng: np.random.Generator, size: int, count: int) -> list[np.ndarray]:
  """Boolean masks of irregular ellipses, placed to touch and overlap."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  shapes, centres = [], []
  for _ in range(count):
    if centres and rng.random() < 0.6:  # Grow next to an existing cell: touching or overlapping.
      cy, cx = centres[rng.integers(len(centres))] + rng.normal(0, size / 12, 2)
    else:
      cy, cx = rng.uniform(0, size, 2)
    a, b = rng.uniform(size / 22, size / 11, 2)
    angle = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / a
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / b
    wobble = 1 + 0.15 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
    shapes.append(u**2 + v**2 < wobble)
    centres.append(np.array([cy, cx]))
  return shapes


def render_cells(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """A microscopy-like field of touching, overlapping cells (the U-Net paper's setting).

  Cells are barely brighter than the background, with granular texture and faint dark
  membranes; a strong, smooth illumination gradient spans the field, so the background on
  its bright side is brighter than cells on its dark side.

  Returns:
    image `[size, size, 3]` uint8 and mask `[size, size]` uint8: 0 background, 1 cell
    interior, 2 cell boundary (1-2 px, including the borders between touching cells).
  """
  shapes = _cell_shapes(rng, size, int(rng.integers(6, 14)))
  labels = np.zeros((size, size), np.int32)
  for index, shape in enumerate(shapes, start=1):
    labels[shape] = index  # Later cells lie on top.
  foreground = labels > 0
  # Boundary: pixels whose 4-neighbourhood holds another label (cell edge or cell-cell border).
  boundary = np.zeros_like(foreground)
  for axis in (0, 1):
    for shift in (1, -1):
      boundary |= (labels != np.roll(labels, shift, axis)) & foreground

  texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 0.8)
  body = 0.42 + 0.07 * foreground + 0.05 * texture * foreground - 0.05 * boundary
  illumination = 0.45 + 0.9 * smooth_noise(rng, size, 2)[..., 0]
  tint = rng.uniform(0.85, 1.0, 3)
  image = illumination[..., None] * body[..., None] * tint * 255
  image += rng.normal(0, 7, image.shape)
  mask = np.where(boundary, 2, foreground.astype(np.uint8))
  return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def smooth_noise_3d(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
  """Low-frequency noise in [0, 1] of `shape`: white noise blurred by a Gaussian of `sigma`
  voxels, rescaled to its own range."""
  field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), sigma, mode='wrap')
  low, high = field.min(), field.max()
  return ((field - low) / max(high - low, 1e-8)).astype(np.float32)


def _walk_3d(rng: np.random.Generator, start: np.ndarray, size: int, steps: int) -> list[np.ndarray]:
  """A smooth random walk in a cube of side `size`: a direction that drifts slowly."""
  direction = rng.normal(0.0, 1.0, 3)
  direction /= np.linalg.norm(direction)
  points, position = [start.astype(np.float64)], start.astype(np.float64)
  for _ in range(steps):
    direction = direction + rng.normal(0.0, 0.25, 3)
    direction /= np.linalg.norm(direction)
    position = position + 0.75 * direction
    if not ((position > -2) & (position < size + 2)).all():
      break
    points.append(position)
  return points


def render_vessels(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """A noisy volume holding a tree of tubes (the 3D analogue of the roads: thin, branching).

  Tubes of radius 1-3.5 voxels (every volume has one of the thinnest) branch from each other
  through a cube of side `size`; they are only slightly brighter than a background whose
  intensity drifts smoothly across the volume, blob-shaped distractors of the tubes' intensity
  lie among them, and Gaussian noise covers everything (as in angiography or light-sheet stacks).

  Returns:
    image `[size, size, size]` uint8 (one channel) and mask `[size, size, size]` uint8 in {0, 1}.
  """
  shape = (size, size, size)
  centre = np.zeros(shape, bool)
  radius = np.zeros(shape, np.float32)
  trunks = []
  for i in range(int(rng.integers(3, 6))):
    start = rng.uniform(0, size, 3)
    start[rng.integers(3)] = 0.0  # each trunk enters through a face
    trunks.append((_walk_3d(rng, start, size, 4 * size), 1.0 if i == 0 else rng.uniform(1.5, 3.5)))
  for points, width in list(trunks):  # branches leave the trunks, thinner
    for _ in range(int(rng.integers(2, 5))):
      if len(points) > 4:
        origin = points[int(rng.integers(1, len(points) - 1))]
        trunks.append((_walk_3d(rng, origin, size, 2 * size), max(1.0, width * rng.uniform(0.5, 0.8))))
  for points, width in trunks:
    voxels = np.rint(np.asarray(points)).astype(int)
    voxels = voxels[((voxels >= 0) & (voxels < size)).all(1)]
    centre[tuple(voxels.T)] = True
    radius[tuple(voxels.T)] = np.maximum(radius[tuple(voxels.T)], width)
  distance, nearest = ndimage.distance_transform_edt(~centre, return_indices=True)
  mask = distance <= radius[tuple(nearest)]

  blobs = np.zeros(shape, bool)  # distractors: compact blobs in the tubes' intensity
  grid = np.indices(shape, dtype=np.float32)
  for _ in range(int(rng.integers(3, 7))):
    at = rng.uniform(0, size, 3)[:, None, None, None]
    blobs |= (((grid - at) / rng.uniform(1.5, 4.0, 3)[:, None, None, None]) ** 2).sum(0) < 1
  background = 0.30 + 0.25 * smooth_noise_3d(rng, shape, size / 6)
  image = background + 0.12 * mask + 0.12 * (blobs & ~mask)
  image = ndimage.gaussian_filter(image, 0.6) + rng.normal(0.0, 0.05, shape)
  return np.clip(image * 255, 0, 255).astype(np.uint8), mask.astype(np.uint8)
