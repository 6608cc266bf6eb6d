"""The deterministic, resumable Grain input pipeline and the dataset's metadata.

Train: source -> this process's shard -> shuffle (seeded, new order each epoch) -> repeat ->
random crop/scale -> flips and rot90 -> [elastic] -> colour -> normalise -> batch -> prefetch.
Eval: source -> shard, padded to whole batches with `valid = 0` examples -> resize ->
normalise -> batch. Every random draw comes from Grain's per-element generators, seeded from
`seed` and the element's position, so the batches depend on nothing else, and the iterator's
`get_state()` / `set_state()` (or Grain's Orbax handler) resume at exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from resunet_jax.data import normalization as normalization_lib
from resunet_jax.data import sources, transforms
from resunet_jax.errors import DataError

# The arrays of a batch that go to the devices ('weight': patch batches only); `id` stays on the host.
BATCH_KEYS = ('image', 'mask', 'valid', 'weight')


def default_config() -> ml_collections.ConfigDict:
  """The `config.data` section with its defaults (the single place they are set)."""
  c = ml_collections.ConfigDict()
  c.name = 'synthetic_roads'  # a TFDS name ('synthetic_cells/three_class_default', ...) or 'folder'
  c.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: $TFDS_DATA_DIR or the default
  c.image_size = 128  # square side the pipeline produces (evaluation; training too without patch_size)
  # Training patches at the images' own scale, `patch_size` square (a cube for volumes, which need it;
  # None: random crops resized to image_size); `foreground_oversampling` of them hold foreground (nnU-Net's 1/3)
  c.patch_size = config_dict.placeholder(int)
  c.spacing = config_dict.placeholder(tuple)  # volumes: voxel size (d, h, w) for every volume; None: each file's
  c.foreground_oversampling = 1 / 3
  # 'resize': evaluation images resized to image_size; 'whole': scored at their own size through a
  # Gaussian sliding window of patch_size (else image_size) tiles (resunet_jax.training.evaluation)
  c.evaluation = 'resize'
  c.image_key = config_dict.placeholder(str)  # TFDS feature keys; None: the known dataset's
  c.mask_key = config_dict.placeholder(str)
  c.label_map = config_dict.placeholder(dict)  # mask value -> class id; None: the dataset's
  c.train_split = config_dict.placeholder(str)  # None: the dataset's split for each role
  c.validation_split = config_dict.placeholder(str)
  c.test_split = config_dict.placeholder(str)
  c.folder = config_dict.placeholder(str)  # root of a folder dataset (name='folder')
  c.holdout_percent = 10  # folder without split folders: percent to validation, and to test
  # another folder layout: {'splits': {role: folder}, 'images': folder, 'masks': folder}; None: the default
  c.folder_layout = config_dict.placeholder(dict)
  c.folder_hint = ''  # added to a missing folder's error: where to get the data
  c.channels = config_dict.placeholder(int)  # image channels, checked in every file; None: the first image's
  c.normalization = 'fixed'  # 'fixed' | 'dataset_zscore' | 'percentile' | 'per_image' (data/normalization.py)
  c.mean = (0.5, 0.5, 0.5)  # 'fixed': (x / 255 - mean) / std, per channel (equal values: any channel count)
  c.std = (0.25, 0.25, 0.25)
  c.stats = config_dict.placeholder(dict)  # dataset kinds: the training split's statistics; None: computed
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_scale = (0.5, 1.0)  # area fraction of the random crop, resized to image_size (not with patch_size)
  c.augment.hflip = True
  c.augment.vflip = True
  c.augment.rot90 = True
  c.augment.brightness = 0.1
  c.augment.contrast = 0.1
  c.augment.gamma = 0.1
  c.augment.elastic_prob = 0.0  # U-Net paper's elastic deformation: 3x3 grid, 10 px
  c.augment.elastic_grid = 3
  c.augment.elastic_sigma = 10.0
  c.read_threads = 4  # Grain read threads per process
  c.prefetch = 32  # elements buffered ahead
  c.num_workers = 0  # Grain worker processes (0: in-process threads only)
  return c


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What configs should not repeat about a dataset.

  Attributes:
    name: dataset name.
    num_classes: classes in the masks, background included (2 for binary).
    image_shape: `(H, W, C)` of the images the pipeline yields (volumes: `(D, H, W, C)` of a patch).
    split_sizes: examples per split role.
    normalization: the rule and statistics that make pixels model inputs.
    spacing: volumes: the median voxel spacing `(d, h, w)` of the training split (what
      `models.pool_strides_for_spacing` reads); None for images.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, ...]
  split_sizes: Mapping[str, int]
  normalization: normalization_lib.Normalization
  spacing: tuple[float, ...] | None = None

  @property
  def spatial_dims(self) -> int:
    """2 for images, 3 for volumes."""
    return len(self.image_shape) - 1

  @property
  def model_outputs(self) -> int:
    """Logits per pixel: 1 (sigmoid) for a binary task, else `num_classes` (softmax)."""
    return 1 if self.num_classes == 2 else self.num_classes


def dataset_info(config: Any, roles: Sequence[str] = sources.SPLIT_ROLES) -> DatasetInfo:
  """Opens (building an embedded dataset if needed) and describes the dataset; computes (or reads
  from the cache) the normalisation statistics the config does not record."""
  normalization_lib.check_kind(config.get('normalization') or 'fixed')
  train = sources.open_split(config, 'train')  # first: the others take its channel count
  opened = {
    role: train if role == 'train' else sources.open_split(config, role, channels=train.channels) for role in roles
  }
  train[0]  # noqa: B018 (its checks: a wrong depth or channel count fails here, before training)
  norm = resolve_normalization(config, train)
  sizes = {role: len(source) for role, source in opened.items()}
  if train.spatial_dims == 3:
    check_volume_config(config)
    spacing = tuple(float(v) for v in np.median([train[i]['spacing'] for i in range(len(train))], 0))
    shape = (config.patch_size,) * 3 + (train.channels,)
    return DatasetInfo(config.name, sources.num_classes(config), shape, sizes, norm, spacing)
  shape = (config.image_size, config.image_size, train.channels)
  return DatasetInfo(config.name, sources.num_classes(config), shape, sizes, norm)


def check_volume_config(config: Any) -> None:
  """One-line errors for the data settings volumes cannot take: volumes train on patches at their
  own scale and are scored whole (nothing resizes a volume), and the elastic deformation is 2-D."""
  if not config.get('patch_size'):
    raise DataError('volumes train on patches at their own scale: set data.patch_size (a cube side, e.g. 32)')
  if (config.get('evaluation') or 'resize') != 'whole':
    raise DataError("volumes are scored at their own size: set data.evaluation='whole' (a 3-D sliding window)")
  if config.augment.elastic_prob > 0:
    raise DataError('data.augment.elastic_prob: the elastic deformation is 2-D; set it to 0 for volumes')


def resolve_normalization(
  config: Any, train: sources.SegmentationSource | None = None, spatial_dims: int | None = None
) -> normalization_lib.Normalization:
  """The normalisation of the data config: its recorded statistics (`data.stats`), else the
  training split's, computed once and cached beside the data (`normalization.cached`); for
  images or volumes as `spatial_dims` says (None: the training split's)."""
  kind = config.get('normalization') or 'fixed'
  normalization_lib.check_kind(kind)
  if kind in ('fixed', 'per_image') or config.get('stats'):
    if not config.get('channels') or (spatial_dims is None and kind == 'per_image'):
      train = train or sources.open_split(config, 'train')
    channels = config.get('channels') or train.channels
    return normalization_lib.of_config(config, channels, spatial_dims or (train.spatial_dims if train else 2))
  train = train or sources.open_split(config, 'train')
  directory, fingerprint = train.cache
  stats = normalization_lib.cached(kind, train, directory, fingerprint, show=jax.process_index() == 0)
  return normalization_lib.from_stats(kind, train.channels, stats, train.spatial_dims)


class _Shard(Sequence):
  """The examples `indices` of a source, each tagged `valid` (0 for padding)."""

  def __init__(self, source: Sequence, indices: np.ndarray, valid: np.ndarray):
    self._source, self._indices, self._valid = source, indices, valid

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict:
    return {**self._source[int(self._indices[index])], 'valid': self._valid[index]}


def shard(num_examples: int, index: int, count: int, *, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Indices of process `index` of `count`, and their validity.

  Without `pad_to`, every process gets the same number of examples, `num_examples // count`
  (training: the remainder is dropped). With it, the shard keeps all its examples and is
  padded with its first index, marked invalid, to `pad_to` (evaluation: nothing dropped,
  equal shapes on every process).
  """
  if pad_to is None:
    indices = np.arange(index, (num_examples // count) * count, count)
    return indices, np.ones(len(indices), np.float32)
  indices = np.arange(index, num_examples, count)
  padding = pad_to - len(indices)
  valid = np.concatenate([np.ones(len(indices), np.float32), np.zeros(padding, np.float32)])
  return np.concatenate([indices, np.full(padding, index)]), valid


def make_pipeline(
  config: Any,
  role: str,
  *,
  batch_size: int,
  seed: int,
  train: bool,
  num_epochs: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
) -> grain.IterDataset:
  """The input pipeline of this process for one split.

  Args:
    config: the `config.data` section (see `default_config`).
    role: 'train' | 'validation' | 'test' (or a raw split string of the dataset).
    batch_size: examples per batch on this process (the global batch / process count).
    seed: shuffling and augmentation seed.
    train: shuffle, repeat and augment; otherwise one padded pass in order.
    num_epochs: training epochs; None repeats forever. Ignored for evaluation.
    shard_index: this process's shard; default `jax.process_index()`.
    shard_count: number of shards; default `jax.process_count()`.

  Returns:
    An iterable of batches `{'image': float32 [B, S, S, C], 'mask': int32 [B, S, S],
    'valid': float32 [B], 'id': str [B]}`, S `data.patch_size` when training on patches (which
    adds `'weight': float32 [B, S, S]`, 0 on the padding of an image smaller than the patch),
    else `data.image_size`; its iterator is checkpointable.
  """
  if batch_size < 1:
    raise DataError(f'batch size {batch_size} must be at least 1')
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  source = sources.open_split(config, role)
  if source.spatial_dims == 3:
    check_volume_config(config)
  if train:
    indices, valid = shard(len(source), index, count)
    if len(indices) < batch_size:
      raise DataError(
        f'{source.name} gives {len(indices)} examples per process, fewer than the per-process batch of '
        f'{batch_size}; lower the batch size'
      )
  else:
    per_process = math.ceil(len(source) / count)
    indices, valid = shard(len(source), index, count, pad_to=math.ceil(per_process / batch_size) * batch_size)
  size, aug = config.image_size, config.augment
  ds = grain.MapDataset.source(_Shard(source, indices, valid)).seed(seed)
  if train:
    ds = ds.shuffle().repeat(num_epochs)
    if config.get('patch_size'):
      if not 0 <= config.foreground_oversampling <= 1:
        raise DataError(f'data.foreground_oversampling={config.foreground_oversampling} must be in [0, 1]')
      ds = ds.random_map(transforms.RandomPatch(config.patch_size, config.foreground_oversampling))
    else:
      ds = ds.random_map(transforms.RandomResizedCrop(size, tuple(aug.crop_scale)))
    ds = ds.random_map(transforms.RandomFlipRotate(aug.hflip, aug.vflip, aug.rot90))
    if aug.elastic_prob > 0:
      ds = ds.random_map(transforms.RandomElastic(aug.elastic_grid, aug.elastic_sigma, aug.elastic_prob))
    ds = ds.random_map(transforms.RandomColor(aug.brightness, aug.contrast, aug.gamma))
  elif source.spatial_dims == 3:
    raise DataError('volumes are scored whole, never batched resized: evaluate with training.evaluation.evaluate_whole')
  else:
    ds = ds.map(transforms.Resize(size))
  norm = resolve_normalization(config, source if role == 'train' else None, source.spatial_dims)
  ds = ds.map(transforms.Normalize(norm))
  ds = ds.batch(batch_size, drop_remainder=train)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch))
  if config.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  return it


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """This process's batch as global arrays split over `sharding` (e.g. `P('data')`).

  The string `id` stays on the host; image, mask, valid (and a patch batch's weight) become one
  global array each.
  """
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(batch[key])) for key in BATCH_KEYS if key in batch
  }
