"""Intensity normalisation: the rule of `config.data.normalization` and its training statistics.

Kinds ('percentile' and 'per_image' are nnU-Net's rules for CT and for other modalities, Isensee
et al., Nature Methods 2021, with statistics of every pixel where nnU-Net uses foreground voxels):
- 'fixed': `(x / 255 - data.mean) / data.std`, for 8-bit images (what every run before this
  setting used).
- 'dataset_zscore': `(x - mean_c) / std_c`, with each channel's mean and std over every pixel of
  the training split.
- 'percentile': `x` clipped to the training split's 0.5 and 99.5 percentiles of channel `c`, then
  z-scored with the clipped values' mean and std.
- 'per_image': each model input z-scored per channel over its own pixels (a training crop, an
  evaluation image, a prediction tile; over its voxels for a volume).

The dataset statistics are computed once (with a progress bar), cached beside the data, written
into the run's config (`data.stats`) and read from there by evaluation, prediction and export,
never recomputed. The same `Normalization` normalises NumPy batches in the input pipeline and
traced `jax.numpy` arrays inside an exported model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from resunet_jax.errors import DataError, suggest

KINDS = ('fixed', 'dataset_zscore', 'percentile', 'per_image')
PERCENTILES = (0.5, 99.5)
# Pixels drawn from each training image for the percentiles (nnU-Net likewise takes its percentiles
# from voxels sampled per case); the mean and std of 'dataset_zscore' use every pixel.
SAMPLES_PER_IMAGE = 16384
_TINY = 1e-8  # 'per_image': the std floor of a constant input (a crop of a uniform background)


@dataclasses.dataclass(frozen=True)
class Normalization:
  """A normalisation rule with its numbers; calling it maps pixels `[..., H, W, C]` (volumes
  `[..., D, H, W, C]`) to model inputs.

  Attributes:
    kind: one of `KINDS`.
    channels: the image channels `C`.
    mean, std: per channel; 'fixed': on the [0, 1] scale; 'dataset_zscore' and 'percentile': in
      pixel values; 'per_image': empty.
    low, high: 'percentile' only: the clipping bounds per channel, in pixel values.
    spatial_dims: 2 for images, 3 for volumes: the axes 'per_image' takes its statistics over.
  """

  kind: str
  channels: int
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()
  low: tuple[float, ...] = ()
  high: tuple[float, ...] = ()
  spatial_dims: int = 2

  def __call__(self, image, xp: Any = np):
    """float32 model inputs of `image` (uint8 or float, `[..., H, W, C]` or `[..., D, H, W, C]`);
    `xp` is `numpy` or `jax.numpy` (traceable: an exported model normalises inside)."""
    if self.kind == 'per_image':
      image = image.astype(xp.float32)
      spatial = tuple(range(-1 - self.spatial_dims, -1))
      mean = image.mean(axis=spatial, keepdims=True)
      std = xp.maximum(image.std(axis=spatial, keepdims=True), _TINY)
      return (image - mean) / std
    mean, std = xp.asarray(self.mean, xp.float32), xp.asarray(self.std, xp.float32)
    if self.kind == 'fixed':
      return (image.astype(xp.float32) / 255.0 - mean) / std
    image = image.astype(xp.float32)
    if self.kind == 'percentile':
      image = xp.clip(image, xp.asarray(self.low, xp.float32), xp.asarray(self.high, xp.float32))
    return (image - mean) / std

  def _scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
    """`(scale, shift)` in pixel values: inputs are `(clipped pixels - shift) / scale`."""
    unit = 255.0 if self.kind == 'fixed' else 1.0
    return unit * np.asarray(self.std, np.float32), unit * np.asarray(self.mean, np.float32)

  def neutral(self, image: np.ndarray) -> np.ndarray:
    """Per channel, the pixel value that becomes 0 (the padding of an image smaller than a tile)."""
    if self.kind == 'per_image':
      return np.asarray(image, np.float32).mean(axis=tuple(range(self.spatial_dims)))
    return self._scale_shift()[1]

  def unnormalise(self, inputs: np.ndarray) -> np.ndarray:
    """Pixel values of model inputs, where the rule can be undone ('percentile' gives the clipped
    pixels); 'per_image' returns the inputs (display stretches them anyway)."""
    if self.kind == 'per_image':
      return inputs
    scale, shift = self._scale_shift()
    return inputs * scale + shift

  def describe(self) -> dict:
    """The rule as JSON (the model card's `normalisation`)."""
    formula = {
      'fixed': '(x / 255 - mean) / std',
      'dataset_zscore': '(x - mean) / std',
      'percentile': '(clip(x, low, high) - mean) / std',
      'per_image': '(x - mean(x)) / std(x), per channel over the input',
    }[self.kind]
    return {'kind': self.kind, 'formula': formula, **{k: list(v) for k, v in self.stats().items()}}

  def stats(self) -> dict[str, tuple[float, ...]]:
    """The numbers of the rule (`data.stats`): mean, std and, for 'percentile', low and high."""
    out = {'mean': self.mean, 'std': self.std}
    if self.kind == 'percentile':
      out.update(low=self.low, high=self.high)
    return out if self.kind != 'per_image' else {}


def check_kind(kind: str) -> None:
  """A one-line error for an unknown `data.normalization`."""
  if kind not in KINDS:
    raise DataError(f"data.normalization='{kind}' is unknown{suggest(kind, KINDS)}; choose one of {', '.join(KINDS)}")


def fixed(mean: Sequence[float], std: Sequence[float], channels: int, spatial_dims: int = 2) -> Normalization:
  """The 'fixed' rule for `channels`: `data.mean` and `data.std` have one value per channel, or
  equal values (the defaults) that apply to any channel count."""
  mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
  for name, values in (('mean', mean), ('std', std)):
    if len(values) != channels and len(set(values)) != 1:
      raise DataError(
        f'data.{name} has {len(values)} values but the images have {channels} channels; give one value per '
        "channel, or use data.normalization='dataset_zscore'"
      )
  if min(std) <= 0:
    raise DataError(f'data.std {std} must be positive')
  return Normalization(
    'fixed', channels, (mean * channels)[:channels], (std * channels)[:channels], spatial_dims=spatial_dims
  )


def from_stats(kind: str, channels: int, stats: dict | None, spatial_dims: int = 2) -> Normalization:
  """A dataset rule from its recorded numbers (`data.stats`, as computed by `compute`); 'per_image'
  over `spatial_dims` axes."""
  if kind == 'per_image':
    return Normalization(kind, channels, spatial_dims=spatial_dims)
  if not stats:
    raise DataError(f"data.normalization='{kind}' has no statistics (data.stats); train the run again to compute them")
  try:
    values = {key: tuple(float(v) for v in stats[key]) for key in ('mean', 'std', 'low', 'high') if key in stats}
    values['mean'], values['std']  # noqa: B018 (both are required)
  except (KeyError, TypeError, ValueError):
    raise DataError(f'data.stats {stats!r} is not a statistics record (mean, std per channel)') from None
  if any(len(v) != channels for v in values.values()):
    raise DataError(f'data.stats holds {len(values["mean"])} channels but the images have {channels}')
  if min(values['std']) <= 0:
    raise DataError(f'data.stats std {values["std"]} must be positive')
  if kind == 'percentile' and not {'low', 'high'} <= set(values):
    raise DataError("data.stats has no percentile bounds (low, high) for data.normalization='percentile'")
  low, high = values.get('low', ()), values.get('high', ())
  return Normalization(kind, channels, values['mean'], values['std'], low, high, spatial_dims)


def of_config(config: Any, channels: int, spatial_dims: int = 2) -> Normalization:
  """The rule of a data config section whose statistics are recorded (a run's config), for images
  (`spatial_dims` 2) or volumes (3)."""
  kind = config.get('normalization') or 'fixed'
  check_kind(kind)
  if kind == 'fixed':
    return fixed(config.mean, config.std, channels, spatial_dims)
  return from_stats(kind, channels, config.get('stats'), spatial_dims)


def compute(kind: str, source: Sequence, *, desc: str = 'normalisation statistics', show: bool = True) -> dict:
  """The statistics of `kind` over every record of `source` (`{'image': [H, W, C], ...}`).

  'dataset_zscore': exact per-channel mean and std of every pixel (accumulated per image in
  float64, images combined with Chan et al.'s pairwise update). 'percentile': the percentiles of
  `SAMPLES_PER_IMAGE` pixels drawn per image (a fixed seed), and the mean and std of those pixels
  clipped to them.

  Raises:
    DataError: a channel whose values are constant over the split (it cannot be scaled).
  """
  check_kind(kind)
  rng = np.random.default_rng(0)
  count, mean, m2, samples = 0, None, None, []
  for index in tqdm(range(len(source)), desc=desc, unit='image', disable=not show, leave=False):
    image = source[index]['image']
    pixels = image.reshape(-1, image.shape[-1]).astype(np.float64)
    if kind == 'percentile':
      take = rng.choice(len(pixels), min(len(pixels), SAMPLES_PER_IMAGE), replace=False)
      samples.append(pixels[np.sort(take)])
      continue
    n, image_mean = len(pixels), pixels.mean(0)
    image_m2 = ((pixels - image_mean) ** 2).sum(0)
    if mean is None:
      count, mean, m2 = n, image_mean, image_m2
    else:
      delta, total = image_mean - mean, count + n
      mean, m2, count = mean + delta * n / total, m2 + image_m2 + delta**2 * count * n / total, total
  out = {}
  if kind == 'percentile':
    pixels = np.concatenate(samples)
    low, high = np.percentile(pixels, PERCENTILES, axis=0)
    clipped = np.clip(pixels, low, high)
    mean, std = clipped.mean(0), clipped.std(0)
    out.update(low=low.tolist(), high=high.tolist())
  else:
    std = np.sqrt(m2 / count)
  constant = np.flatnonzero(~(std > 0))
  if constant.size:
    raise DataError(
      f'{desc}: channel {int(constant[0])} has one value over the whole training split, which no '
      'normalisation can scale; drop that channel from the images'
    )
  return {'mean': mean.tolist(), 'std': std.tolist(), **out}


def cached(kind: str, source: Sequence, cache_dir: pathlib.Path, fingerprint: str, *, show: bool = True) -> dict:
  """`compute`'s statistics, read from `cache_dir` when computed before for the same `fingerprint`.

  The cache is one JSON file per kind and fingerprint, written atomically; an unreadable one is
  computed again, and a folder that cannot be written is skipped with a note (the run still has
  its statistics in its config).
  """
  key = hashlib.sha256(f'{kind}|{fingerprint}'.encode()).hexdigest()[:12]
  path = cache_dir / f'normalization-{kind}-{key}.json'
  try:
    stats = json.loads(path.read_text())['stats']
    if isinstance(stats, dict):
      return stats
  except (OSError, ValueError, KeyError, TypeError):
    pass
  stats = compute(kind, source, desc=f'{kind} statistics of {getattr(source, "name", "the training split")}', show=show)
  temporary = path.with_name(f'.{path.name}.{os.getpid()}')
  try:
    temporary.write_text(json.dumps({'kind': kind, 'fingerprint': fingerprint, 'stats': stats}))
    os.replace(temporary, path)
  except OSError as e:
    temporary.unlink(missing_ok=True)
    print(f'note: cannot cache the normalisation statistics in {cache_dir} ({e.strerror}); they are in the run config')
  return stats
