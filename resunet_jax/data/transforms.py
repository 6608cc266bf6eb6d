"""Grain transforms on `{'image' [H, W, C] uint8 or float32, 'mask' uint8 [H, W], ...}` records
(patches, flips and colour also on volumes: image `[D, H, W, C]`, mask `[D, H, W]`).

Geometric transforms move image and mask together (image resampled bilinearly, mask by
nearest neighbour, so class ids stay class ids); photometric ones touch the image only.
Classes are module-level and picklable, as Grain's worker processes require. Random
transforms draw only from the `rng` Grain passes in, so a pipeline's output is a function of
its seed and position, and a restored iterator repeats it exactly.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from PIL import Image
from scipy import ndimage

from resunet_jax.data.normalization import Normalization
from resunet_jax.errors import DataError


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int, box=None) -> tuple[np.ndarray, np.ndarray]:
  """Crops `box` (left, top, right, bottom; default whole) and resizes to `size` x `size`.

  Image and mask may differ in size (each is resized on its own, as TFDS mocks and some
  datasets need): the box is given in the image's pixels and scaled to the mask's.
  """
  height, width = image.shape[:2]
  box = box or (0, 0, width, height)
  mask_box = box
  if mask.shape != (height, width):
    sy, sx = mask.shape[0] / height, mask.shape[1] / width
    mask_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  if image.shape[:2] == (size, size) and mask.shape == (size, size) and box == (0, 0, width, height):
    return image, mask
  if image.dtype == np.uint8 and image.shape[-1] == 3:
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))
  else:  # Channel by channel ('L' or 'F' images): Pillow's RGBA resize would weight by a 4th channel.
    mode = 'L' if image.dtype == np.uint8 else 'F'
    channels = [Image.fromarray(image[..., c].astype(image.dtype), mode) for c in range(image.shape[-1])]
    image = np.stack([np.asarray(c.resize((size, size), Image.BILINEAR, box=box)) for c in channels], -1)
  mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST, box=mask_box))
  return image, mask


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
  """Whole image to `size` x `size` (evaluation)."""

  size: int

  def map(self, element: dict) -> dict:
    image, mask = resize_pair(element['image'], element['mask'], self.size)
    return {**element, 'image': image, 'mask': mask}


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(grain.transforms.RandomMap):
  """A random box of `scale` of the area and `ratio` aspect, resized to `size` x `size`."""

  size: int
  scale: tuple[float, float] = (0.5, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element['image']
    height, width = image.shape[:2]
    area = height * width * rng.uniform(*self.scale)
    aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
    box_w = min(width, np.sqrt(area * aspect))
    box_h = min(height, np.sqrt(area / aspect))
    left, top = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
    image, mask = resize_pair(image, element['mask'], self.size, (left, top, left + box_w, top + box_h))
    return {**element, 'image': image, 'mask': mask}


@dataclasses.dataclass(frozen=True)
class RandomPatch(grain.transforms.RandomMap):
  """A `size` x `size` patch (a `size` cube of a volume) at the image's own scale, nothing resized
  (patch training at native resolution, as nnU-Net's sampler: Isensee et al., Nature Methods 2021).

  With probability `foreground` the patch is made to hold foreground: a pixel of a class other
  than 0 is drawn uniformly from the mask and the patch placed uniformly among those that contain
  it (nnU-Net oversamples a third of its patches so); otherwise, or when the mask has no
  foreground, the patch is placed uniformly. Image and mask must have the same size. A side
  shorter than `size` is padded first (image by its edge pixels, mask by 0), and the element gains
  `weight`, uint8 of the patch's shape: 1 on the image's pixels, 0 on the padding, which `Normalize`
  sets to 0 and the loss and training metrics leave out (nnU-Net pads so and ignores the padding).
  """

  size: int
  foreground: float = 1 / 3

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image, mask = element['image'], element['mask']
    spatial = image.shape[: mask.ndim]
    if mask.shape != spatial or image.ndim != mask.ndim + 1:
      raise DataError(f'{element["id"]}: mask {mask.shape} and image {spatial} differ; patches need equal sizes')
    patch = (self.size,) * mask.ndim
    weight = None  # padding: 1 on the image's pixels, 0 on the padding
    if min(spatial) < self.size:
      pads = [(0, max(0, self.size - n)) for n in spatial]
      image = np.pad(image, [*pads, (0, 0)], mode='edge')
      mask, weight = np.pad(mask, pads), np.pad(np.ones(spatial, np.uint8), pads)
      spatial = mask.shape
    forced = rng.random() < self.foreground
    where = np.nonzero(mask) if forced else ((),)
    if len(where[0]):
      pick = int(rng.integers(len(where[0])))
      corner = [
        int(rng.integers(max(0, int(at[pick]) - self.size + 1), min(int(at[pick]), n - self.size) + 1))
        for at, n in zip(where, spatial, strict=True)
      ]
    else:
      corner = [int(rng.integers(n - self.size + 1)) for n in spatial]
    window = tuple(slice(start, start + self.size) for start in corner)
    return {
      **element,
      'image': np.ascontiguousarray(image[window]),
      'mask': np.ascontiguousarray(mask[window]),
      'weight': np.ones(patch, np.uint8) if weight is None else np.ascontiguousarray(weight[window]),
    }


@dataclasses.dataclass(frozen=True)
class RandomFlipRotate(grain.transforms.RandomMap):
  """Random horizontal/vertical flips and multiples of 90 degrees (square inputs).

  On a volume `[D, H, W, ...]` the same acts on each slice (W flipped by `hflip`, H by `vflip`,
  turns in the H-W plane) and `vflip` also flips D, with a draw of its own.
  """

  hflip: bool = True
  vflip: bool = True
  rot90: bool = True

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    names = [name for name in ('image', 'mask', 'weight') if name in element]
    arrays = [element[name] for name in names]
    first = element['mask'].ndim - 2  # the H axis: 0 for an image, 1 for a volume
    flip_h, flip_v, turns = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(4))
    if self.hflip and flip_h:
      arrays = [np.flip(a, first + 1) for a in arrays]
    if self.vflip and flip_v:
      arrays = [np.flip(a, first) for a in arrays]
    if self.rot90 and turns and arrays[0].shape[first] == arrays[0].shape[first + 1]:
      arrays = [np.rot90(a, turns, axes=(first, first + 1)) for a in arrays]
    if first and self.vflip and rng.random() < 0.5:
      arrays = [a[::-1] for a in arrays]
    return {**element, **{name: np.ascontiguousarray(a) for name, a in zip(names, arrays, strict=True)}}


@dataclasses.dataclass(frozen=True)
class RandomElastic(grain.transforms.RandomMap):
  """Elastic deformation of the U-Net paper (Ronneberger et al. 2015, section 3.1).

  Displacement vectors are drawn on a coarse `grid` x `grid` lattice from a normal
  distribution with `sigma` pixels of standard deviation (the paper: 3x3, 10 px),
  interpolated bicubically to every pixel; the image is resampled bilinearly, the mask by
  nearest neighbour. Applied with probability `prob`.
  """

  grid: int = 3
  sigma: float = 10.0
  prob: float = 0.5

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    coarse = rng.normal(0.0, self.sigma, (2, self.grid, self.grid)).astype(np.float32)
    if rng.random() >= self.prob:
      return element
    image, mask = element['image'], element['mask']
    height, width = mask.shape
    dy, dx = (np.asarray(Image.fromarray(c).resize((width, height), Image.BICUBIC)) for c in coarse)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    coords = np.stack([rows + dy, cols + dx])
    mask = ndimage.map_coordinates(mask, coords, order=0, mode='reflect')
    if image.shape[:2] != (height, width):
      image, _ = resize_pair(image, mask, height)
    channels = [ndimage.map_coordinates(image[..., c], coords, order=1, mode='reflect') for c in range(image.shape[-1])]
    out = {**element, 'image': np.stack(channels, -1), 'mask': mask}
    if 'weight' in element:  # the padding moves as the mask does
      out['weight'] = ndimage.map_coordinates(element['weight'], coords, order=0, mode='reflect')
    return out


@dataclasses.dataclass(frozen=True)
class RandomColor(grain.transforms.RandomMap):
  """Brightness, contrast and gamma jitter on the image (the mask is untouched).

  With `u` uniform in [-1, 1], on pixels scaled to [0, 1]: brightness adds `brightness * u`,
  contrast scales about the mean by `1 + contrast * u`, gamma raises to `exp(gamma * u)`.
  uint8 pixels are scaled by 255 (all channels together); other pixels by each channel's own
  minimum and maximum and mapped back after, as nnU-Net's gamma transform does, so the jitter
  means the same on 8-bit, 16-bit and float images of any channel count.
  """

  brightness: float = 0.1
  contrast: float = 0.1
  gamma: float = 0.1

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    b, c, g = rng.uniform(-1.0, 1.0, 3)
    image = element['image']
    if image.dtype == np.uint8:
      image = self._jitter(image.astype(np.float32) / 255.0, b, c, g)
      return {**element, 'image': (image * 255.0 + 0.5).astype(np.uint8)}
    spatial = tuple(range(image.ndim - 1))
    low, high = image.min(axis=spatial), image.max(axis=spatial)
    span = np.where(high > low, high - low, 1.0).astype(np.float32)
    jittered = self._jitter((image - low) / span, b, c, g) * span + low
    return {**element, 'image': jittered.astype(np.float32)}

  def _jitter(self, image: np.ndarray, b: float, c: float, g: float) -> np.ndarray:
    image = (image - image.mean()) * (1 + self.contrast * c) + image.mean() + self.brightness * b
    return np.clip(image, 0.0, 1.0) ** np.exp(self.gamma * g)


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """To model inputs: image float32 by `normalization` (`data.normalization`), mask int32,
  `valid` float32; a `weight` (padding 0, `RandomPatch`) becomes float32 and zeroes the padded
  image pixels, as the sliding window pads normalised inputs with 0."""

  normalization: Normalization

  def map(self, element: dict) -> dict:
    out = {
      'image': self.normalization(element['image']),
      'mask': element['mask'].astype(np.int32),
      'valid': np.float32(element.get('valid', 1.0)),
      'id': element['id'],
    }
    if 'weight' in element:
      out['weight'] = element['weight'].astype(np.float32)
      out['image'] = out['image'] * out['weight'][..., None]
    return out
