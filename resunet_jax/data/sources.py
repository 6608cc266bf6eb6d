"""Random-access sources of (image, mask, id) records: TFDS datasets and image folders.

Every source yields the same record, whatever the dataset: `image` `[H, W, C]` (uint8 as
stored, other pixels as float32; `C` is `data.channels`, the same for every image), `mask`
uint8 `[H, W]` of class ids, `id` str. A volume dataset (`spatial_dims` 3: `synthetic_vessels`,
a folder of NIfTI files or TIFF stacks) yields `image` `[D, H, W, C]`, `mask` `[D, H, W]` and
`spacing` float32 `[3]`, the voxel size along D, H, W (`data.spacing`, else the file's own).
Mask values are mapped through `data.label_map`; a value the map does not name is an error,
never a silent class.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tifffile
from PIL import Image

from resunet_jax.data import builders, volumes
from resunet_jax.errors import DataError, suggest

SPLIT_ROLES = ('train', 'validation', 'test')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', *volumes.NIFTI_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class TfdsDefaults:
  """How to read a known TFDS dataset; the config's non-None data keys override these."""

  image_key: str = 'image'
  mask_key: str = 'mask'
  label_map: Mapping[int, int] | None = None
  splits: Mapping[str, str] = dataclasses.field(
    default_factory=lambda: {'train': 'train', 'validation': 'validation', 'test': 'test'}
  )


EMBEDDED = {
  'synthetic_roads': builders.SyntheticRoads,
  'synthetic_cells': builders.SyntheticCells,
  'synthetic_vessels': builders.SyntheticVessels,
}
KNOWN_TFDS: dict[str, TfdsDefaults] = {
  'synthetic_roads': TfdsDefaults(),
  'synthetic_cells': TfdsDefaults(),
  'synthetic_vessels': TfdsDefaults(),
  # Trimap: 1 pet, 2 background, 3 border (Parkhi et al., CVPR 2012); background becomes 0.
  'oxford_iiit_pet': TfdsDefaults(
    mask_key='segmentation_mask',
    label_map={1: 1, 2: 0, 3: 2},
    splits={'train': 'train[:90%]', 'validation': 'train[90%:]', 'test': 'test'},
  ),
}


def base_name(name: str) -> str:
  """'synthetic_cells/three_class_small:1.0.0' -> 'synthetic_cells'."""
  return name.split('/')[0].split(':')[0]


def data_dir(config: Any) -> str | None:
  """The TFDS data directory: `config.data_dir`, else $TFDS_DATA_DIR, else the TFDS default."""
  return config.get('data_dir') or os.environ.get('TFDS_DATA_DIR') or None


def split_name(config: Any, role: str) -> str:
  """The split string for `role` ('train' | 'validation' | 'test', or a raw split string)."""
  key = f'{role}_split'
  if role in SPLIT_ROLES and config.get(key):
    return config[key]
  if config.name == 'folder':
    return role
  defaults = KNOWN_TFDS.get(base_name(config.name), TfdsDefaults())
  return defaults.splits.get(role, role)


def label_lut(label_map: Mapping[Any, int] | None) -> np.ndarray | None:
  """A 256-entry lookup table: mask value -> class id, -1 where the map says nothing."""
  if label_map is None:
    return None
  lut = np.full(256, -1, np.int16)
  for value, label in dict(label_map).items():
    try:
      value, label = int(value), int(label)
    except ValueError:
      raise DataError(f'data.label_map entry {value!r}: {label!r} is not an int-to-int mapping') from None
    if not (0 <= value < 256 and 0 <= label < 256):
      raise DataError(f'data.label_map entry {value}: {label} is out of range; mask values and classes are 0..255')
    lut[value] = label
  return lut


class SegmentationSource(Sequence):
  """Normalises records of a base source to `{'image', 'mask', 'id'}` (see module doc).

  Attributes:
    name: dataset and split, for messages.
    channels: the channel count every image is checked to have; None: unchecked.
    eight_bit: images must be uint8 (`check_image`).
    varying: no image channel may be constant (`check_image`).
    spatial_dims: 2 for images, 3 for volumes.
    spacing: volumes: the voxel spacing every record gets (`data.spacing`); None: the record's own.
  """

  def __init__(
    self,
    base,
    name: str,
    image_key: str,
    mask_key: str,
    lut: np.ndarray | None,
    channels: int | None = None,
    eight_bit: bool = False,
    varying: bool = False,
    cache: Callable[[], tuple[pathlib.Path, str]] | None = None,
    spatial_dims: int = 2,
    spacing: Sequence[float] | None = None,
  ):
    self._base, self.name = base, name
    self._image_key, self._mask_key, self._lut = image_key, mask_key, lut
    self.channels, self.eight_bit, self.varying, self._cache = channels, eight_bit, varying, cache
    self.spatial_dims, self.spacing = spatial_dims, spacing

  def checked(self, channels: int | None, eight_bit: bool, varying: bool = False) -> SegmentationSource:
    """The same records, each image checked by `check_image` with these arguments."""
    out = copy.copy(self)
    out.channels, out.eight_bit, out.varying = channels, eight_bit, varying
    return out

  @property
  def cache(self) -> tuple[pathlib.Path, str]:
    """Where statistics of these records are cached, and a fingerprint of the records."""
    return self._cache()

  def __len__(self) -> int:
    return len(self._base)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._base[index]
    try:
      image, mask = record[self._image_key], record[self._mask_key]
    except KeyError as e:
      raise DataError(
        f'{self.name}: no feature {e}; it has {sorted(record)}: set data.image_key and data.mask_key'
      ) from None
    record_id = record.get('id', record.get('file_name', str(index)))
    record_id = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
    where = f'{self.name} {record_id}'
    image = check_image(
      image,
      where,
      channels=self.channels,
      eight_bit=self.eight_bit,
      varying=self.varying,
      spatial_dims=self.spatial_dims,
    )
    out = {'image': image, 'mask': self._map(mask, record_id), 'id': record_id}
    if self.spatial_dims == 3:
      out['spacing'] = check_spacing(self.spacing if self.spacing is not None else record.get('spacing'), where)
    return out

  def _map(self, mask: np.ndarray, record_id: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == self.spatial_dims + 1 and mask.shape[-1] == 1:
      mask = mask[..., 0]
    if mask.ndim != self.spatial_dims:
      raise DataError(f'{self.name} {record_id}: mask has shape {mask.shape}; masks are single-channel class ids')
    if mask.dtype != np.uint8:
      if mask.min() < 0 or mask.max() > 255:
        raise DataError(f'{self.name} {record_id}: mask values span {mask.min()}..{mask.max()}; expected 0..255')
      mask = mask.astype(np.uint8)
    if self._lut is None:
      return mask
    mapped = self._lut[mask]
    if (mapped < 0).any():
      bad = sorted(set(np.unique(mask[mapped < 0]).tolist()))
      raise DataError(
        f'{self.name} {record_id}: mask values {bad[:8]} are not in data.label_map '
        f'(maps {sorted(int(v) for v in np.flatnonzero(self._lut >= 0))}); add them to data.label_map'
      )
    return mapped.astype(np.uint8)


INTEGER_DTYPES = ('uint8', 'int8', 'uint16', 'int16')  # exact in float32, as all image dtypes here
FLOAT_DTYPES = ('float16', 'float32', 'float64')


def check_spacing(spacing, where: str) -> np.ndarray:
  """A volume's voxel spacing as float32 `[3]`, or a one-line error where it is missing or invalid."""
  if spacing is None:
    raise DataError(
      f'{where}: the volume records no voxel spacing, which pooling and the distance metrics need; '
      'set --config.data.spacing="(d, h, w)" (the voxel size along each axis)'
    )
  values = np.asarray(spacing, np.float32).reshape(-1)
  if values.shape != (3,) or not (np.isfinite(values).all() and (values > 0).all()):
    raise DataError(f'{where}: voxel spacing {list(np.ravel(spacing))} must be 3 positive sizes (d, h, w)')
  return values


def check_image(
  image: np.ndarray,
  where: str,
  *,
  channels: int | None = None,
  eight_bit: bool = False,
  varying: bool = False,
  spatial_dims: int = 2,
) -> np.ndarray:
  """An image as the pipeline takes it: uint8 `[H, W, C]` kept, any other pixels float32.

  Args:
    image: `[H, W]` or `[H, W, C]` of 8- or 16-bit integers or floats; with `spatial_dims=3` a
      volume `[D, H, W]` or `[D, H, W, C]`.
    where: the file or record, for messages.
    channels: the channel count every image must have (`data.channels`); None: any.
    eight_bit: only uint8 pixels ('fixed' normalisation divides by 255: wider pixels would saturate).
    varying: every channel must take more than one value ('per_image' divides by the image's std).
    spatial_dims: 2 for images, 3 for volumes.

  Raises:
    DataError: another shape, dtype or channel count, non-finite values, wide pixels where
      `eight_bit` is set, or a constant channel where `varying` is. Nothing is converted silently
      (no channel repeated, added or dropped).
  """
  image = np.asarray(image)
  if image.ndim == spatial_dims:
    image = image[..., None]
  if image.ndim != spatial_dims + 1:
    if spatial_dims == 3:
      raise DataError(
        f'{where}: image shape {image.shape} is not a volume [D, H, W] or [D, H, W, channels]; '
        'this dataset and its 3-D model take volumes (a 2-D image needs a 2-D model: model.spatial_dims=2)'
      )
    raise DataError(f'{where}: image shape {image.shape}; expected [H, W] or [H, W, channels]')
  if image.dtype.name not in INTEGER_DTYPES + FLOAT_DTYPES:
    raise DataError(
      f'{where}: {image.dtype} pixels cannot be read; images are 8- or 16-bit integers or floats: convert the file'
    )
  if channels is not None and image.shape[-1] != channels:
    raise DataError(
      f'{where}: image has {image.shape[-1]} channels but data.channels is {channels}; every image needs the '
      f'same channel count (set --config.data.channels={image.shape[-1]} if all have {image.shape[-1]})'
    )
  spatial = tuple(range(spatial_dims))
  if varying and (flat := np.flatnonzero(image.min(spatial) == image.max(spatial))).size:
    raise DataError(
      f"{where}: channel {int(flat[0])} is constant; data.normalization='per_image' cannot scale it: "
      'remove the image or use dataset_zscore'
    )
  if image.dtype == np.uint8:
    return image
  if eight_bit:
    raise DataError(
      f"{where}: {image.dtype} pixels ({image.min()}..{image.max()}); data.normalization='fixed' divides 8-bit "
      'pixels by 255 and would saturate these: '
      'set --config.data.normalization=dataset_zscore (or percentile, per_image)'
    )
  image = image.astype(np.float32)
  if not np.isfinite(image).all():
    raise DataError(f'{where}: image holds NaN or infinite values; replace them in the file')
  return image


def fit_channels(
  image: np.ndarray,
  channels: int,
  where: str,
  *,
  eight_bit: bool = False,
  varying: bool = False,
  spatial_dims: int = 2,
) -> tuple[np.ndarray, str | None]:
  """`image` (checked as `check_image` does) for a model of `channels` inputs, and a note when
  converted: an 8-bit grey image is repeated and an 8-bit RGBA image loses its alpha for a
  3-channel (RGB) model; any other mismatch is an error (prediction reads photos this way,
  training never converts)."""
  image = check_image(image, where, eight_bit=eight_bit, varying=varying, spatial_dims=spatial_dims)
  have = image.shape[-1]
  if have == channels:
    return image, None
  if image.dtype == np.uint8 and channels == 3 and have in (1, 4):
    note = 'grey, repeated to RGB' if have == 1 else 'RGBA, alpha dropped'
    return (np.repeat(image, 3, -1) if have == 1 else image[..., :3]), f'{where}: 8-bit {note} for the RGB model'
  raise DataError(
    f'{where}: image has {have} channels, the model takes {channels}; give it images like its training data'
  )


def prepare_embedded(name: str, directory: str | None) -> None:
  """Builds an embedded dataset (all splits) into the TFDS data directory unless present."""
  builder = tfds.builder(name, data_dir=directory)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')


def open_tfds(config: Any, role: str) -> SegmentationSource:
  """The TFDS dataset `config.name` as a `SegmentationSource` for split `role`."""
  name, directory = config.name, data_dir(config)
  known = KNOWN_TFDS.get(base_name(name))
  if base_name(name) in EMBEDDED:
    prepare_embedded(name, directory)
  elif base_name(name) not in tfds.list_builders(with_community_datasets=False):
    choices = ', '.join([*KNOWN_TFDS, 'folder', 'or any TFDS dataset name'])
    raise DataError(f"unknown dataset '{name}'{suggest(base_name(name), [*KNOWN_TFDS, 'folder'])}; known: {choices}")
  split = split_name(config, role)
  try:
    # download=False: a missing dataset fails now instead of trying the network.
    base = tfds.data_source(name, split=split, data_dir=directory, download=False)
  except (AssertionError, FileNotFoundError, NotImplementedError, ValueError) as e:
    where = directory or 'the default TFDS data directory'
    prepared = tfds.builder(name, data_dir=directory).is_prepared()
    reason = ' '.join(str(e).split())[:200] if prepared else 'not prepared'
    raise DataError(
      f"dataset '{name}' split '{split}' is not available in {where} ({reason}); prepare it on a machine "
      f'with internet access with `tfds build {name} --data_dir=DIR` and set data.data_dir or TFDS_DATA_DIR'
    ) from None
  if len(base) == 0:
    raise DataError(f"dataset '{name}' split '{split}' is empty; choose another split")
  known = known or TfdsDefaults()
  label_map = config.get('label_map') or known.label_map
  image_key = config.get('image_key') or known.image_key
  mask_key = config.get('mask_key') or known.mask_key

  def cache() -> tuple[pathlib.Path, str]:  # the prepared dataset's versioned folder
    return pathlib.Path(tfds.builder(name, data_dir=directory).data_dir), f'{name}|{split}|{image_key}'

  info = getattr(base, 'dataset_info', None)  # None for a mocked source (tfds.testing.mock_data)
  features = info.features if info is not None else {}  # a FeaturesDict: a mapping without .get
  shape = features[image_key].shape if image_key in features else ()
  spatial_dims = 3 if len(shape) == 4 else 2  # [D, H, W, C] tensors are volumes
  return SegmentationSource(
    base, f'{name}[{split}]', image_key, mask_key, label_lut(label_map), cache=cache, spatial_dims=spatial_dims
  )


def _stems(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  files = ((volumes.split_suffix(p), p) for p in sorted(folder.iterdir()))
  return {stem: p for (stem, suffix), p in files if suffix in IMAGE_SUFFIXES}


def _holdout_bucket(stem: str) -> int:
  # A stable hash: adding files never moves an existing file to another split.
  return int(hashlib.md5(stem.encode()).hexdigest(), 16) % 100


class _FolderFiles(Sequence):
  """Pairs of image and mask files, read with Pillow and tifffile (volumes: `resunet_jax.data.volumes`)."""

  def __init__(self, pairs: list[tuple[str, pathlib.Path, pathlib.Path]], volume: bool = False):
    self.pairs, self.volume = pairs, volume

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict[str, Any]:
    stem, image_path, mask_path = self.pairs[index]
    if self.volume:
      image = volumes.read(image_path, 'image')
      mask = read_mask_array(volumes.read(mask_path, 'mask'), mask_path)
      return {'image': image, 'mask': mask, 'id': stem, 'spacing': volumes.spacing_of(image_path, 'image')}
    return {'image': read_image(image_path), 'mask': read_mask(mask_path), 'id': stem}


TIFF_SUFFIXES = ('.tif', '.tiff')
CHANNEL_AXES = 'SCQI'  # tifffile's axis letters for samples, channels and pages stacked as channels
COLOUR_MODES = ('P', 'PA', 'CMYK', 'YCbCr', 'LAB', 'HSV')  # colour encodings: read as RGB


def _open_image(path: pathlib.Path, kind: str) -> Image.Image:
  try:
    return Image.open(path)
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read {kind} {path}: {e}; replace or remove the file') from None


def _tiff_series(path: pathlib.Path, kind: str) -> tuple[tuple[int, ...], str, Any]:
  """The first series of a TIFF: its shape, axes and the open file (for `asarray`)."""
  try:
    tiff = tifffile.TiffFile(path)
    series = tiff.series[0]
    return series.shape, series.axes, tiff
  except (OSError, ValueError, IndexError, tifffile.TiffFileError) as e:
    raise DataError(f'cannot read {kind} {path}: {e}; replace or remove the file') from None


def _tiff_layout(shape: tuple[int, ...], axes: str, path: pathlib.Path) -> tuple[list[int], tuple[int, int]]:
  """The axis order that gives `[H, W, C]` (length-one axes dropped) and `(H, W)`."""
  kept = [i for i, (size, axis) in enumerate(zip(shape, axes, strict=True)) if size > 1 or axis in 'YX']
  names = ''.join(axes[i] for i in kept)
  extra = [i for i in kept if axes[i] not in 'YX']
  if 'Y' not in names or 'X' not in names or len(extra) > 1 or any(axes[i] not in CHANNEL_AXES for i in extra):
    raise DataError(f'{path} holds a {axes} array of shape {shape}; a 2-D image (with channels) is expected')
  order = [axes.index('Y'), axes.index('X'), *extra]
  return order, (shape[order[0]], shape[order[1]])


def _read_pixels(path: pathlib.Path, kind: str) -> np.ndarray:
  """A file's pixels as stored: TIFF through tifffile (any dtype and channel count), other
  formats through Pillow (palette and other colour encodings as RGB)."""
  if path.suffix.lower() in TIFF_SUFFIXES:
    shape, axes, tiff = _tiff_series(path, kind)
    with tiff:
      order, _ = _tiff_layout(shape, axes, path)
      try:
        pixels = tiff.series[0].asarray()
      except (OSError, ValueError, tifffile.TiffFileError) as e:
        raise DataError(f'cannot read {kind} {path}: {e}; replace or remove the file') from None
    kept = [i for i in range(pixels.ndim) if i in order]
    return pixels.reshape([pixels.shape[i] for i in kept]).transpose([kept.index(i) for i in order])
  with _open_image(path, kind) as image:
    try:
      if image.mode in COLOUR_MODES:
        image = image.convert('RGB')
      elif image.mode == '1' or (kind == 'mask' and image.mode == 'LA'):
        image = image.convert('L')
      pixels = np.asarray(image)
    except (OSError, ValueError) as e:
      raise DataError(f'cannot read {kind} {path}: {e}; replace or remove the file') from None
  if image.mode == 'I':  # Pillow's 32-bit integers: how it reads some 16-bit PNGs
    if pixels.min() < 0 or pixels.max() > 65535:
      raise DataError(f'{kind} {path} has 32-bit values {pixels.min()}..{pixels.max()}; save it as 16-bit or float')
    pixels = pixels.astype(np.uint16)
  return pixels.astype(pixels.dtype.newbyteorder('='))


def _size(path: pathlib.Path, kind: str) -> tuple[int, int]:
  """`(width, height)` of an image file from its header."""
  if path.suffix.lower() in TIFF_SUFFIXES:
    shape, axes, tiff = _tiff_series(path, kind)
    with tiff:
      height, width = _tiff_layout(shape, axes, path)[1]
    return width, height
  with _open_image(path, kind) as image:
    return image.size


def read_image(path: pathlib.Path) -> np.ndarray:
  """An image file's pixels as stored, `[H, W, C]`: 8- or 16-bit integers or floats, any channels.

  Checked by `check_image` where they are used. Raises DataError for an unreadable file.
  """
  pixels = _read_pixels(path, 'image')
  return pixels[..., None] if pixels.ndim == 2 else pixels


def read_mask(path: pathlib.Path) -> np.ndarray:
  """A mask file as uint8 `[H, W]` values (palette indices kept; equal-channel RGB allowed)."""
  mask = _read_pixels(path, 'mask') if path.suffix.lower() in TIFF_SUFFIXES else None
  if mask is None:
    with _open_image(path, 'mask') as image:
      try:
        mask = np.asarray(image.convert('L') if image.mode in ('1', 'LA') else image)
      except (OSError, ValueError) as e:
        raise DataError(f'cannot read mask {path}: {e}; replace or remove the file') from None
  if mask.ndim == 3:
    if not (mask == mask[..., :1]).all():
      raise DataError(f'mask {path} is colour ({mask.shape[-1]} differing channels); save masks as class ids')
    mask = mask[..., 0]
  return read_mask_array(mask, path)


def read_mask_array(mask: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Mask values as uint8 class ids, or a one-line error for values that are not 0..255 integers."""
  if mask.dtype != np.uint8:
    if mask.min() < 0 or mask.max() > 255 or (mask != np.round(mask)).any():
      raise DataError(f'mask {path} has values {mask.min()}..{mask.max()}; masks hold class ids 0..255')
    mask = mask.astype(np.uint8)
  return mask


def open_folder(config: Any, role: str) -> SegmentationSource:
  """A folder dataset: `images/` and `masks/` with matching stems (module doc of the config).

  `ROOT/{train,validation,test}/{images,masks}` gives the splits; otherwise `ROOT/images` and
  `ROOT/masks` are split by a stable hash of each stem: `data.holdout_percent` percent to
  validation, as many to test, the rest to train. `data.folder_layout` renames the folders of
  another layout: `splits` (role -> folder), `images`, `masks`; e.g. MoNuSeg's
  `{Train,Val,Test}_Folder/{img,labelcol}` (experiments/configs/monuseg.py). `data.folder_hint`
  is added to the errors of a missing folder: where to get the data.
  """
  hint = f' ({config.folder_hint})' if config.get('folder_hint') else ''
  if not config.get('folder'):
    raise DataError(f"data.name='folder' needs data.folder=PATH (a folder holding images/ and masks/){hint}")
  root = pathlib.Path(config.folder).expanduser()
  if not root.is_dir():
    raise DataError(f'data.folder {root} does not exist; point it at a folder holding images/ and masks/{hint}')
  layout = config.get('folder_layout') or {}
  split_root = root / dict(layout.get('splits') or {}).get(role, role)
  by_split = split_root.is_dir()
  base = split_root if by_split else root
  names = {'images': layout.get('images') or 'images', 'masks': layout.get('masks') or 'masks'}
  for sub in names.values():
    if not (base / sub).is_dir():
      raise DataError(
        f'{base / sub} is missing; a folder dataset has {names["images"]}/ and {names["masks"]}/ (or per split){hint}'
      )
  images, masks = _stems(base / names['images']), _stems(base / names['masks'])
  unmatched = sorted(set(images) ^ set(masks))
  if unmatched:
    few = ', '.join(f'{s} (no {"mask" if s in images else "image"})' for s in unmatched[:3])
    raise DataError(
      f'{len(unmatched)} files in {base} have no partner: {few}; give every image a mask of the same stem'
    )
  stems = sorted(images)
  if not by_split:
    if role not in SPLIT_ROLES:
      raise DataError(f"folder split '{role}' is not one of {', '.join(SPLIT_ROLES)}")
    holdout = int(config.get('holdout_percent', 10))
    low = {'validation': 0, 'test': holdout, 'train': 2 * holdout}[role]
    high = {'validation': holdout, 'test': 2 * holdout, 'train': 100}[role]
    stems = [s for s in stems if low <= _holdout_bucket(s) < high]
  if not stems:
    raise DataError(f"split '{role}' of folder dataset {root} is empty; add files or change data.holdout_percent")
  pairs = [(s, images[s], masks[s]) for s in stems]
  volume = volumes.is_volume(pairs[0][1])  # a folder of NIfTI files or TIFF stacks holds volumes
  for stem, image_path, mask_path in pairs:  # Headers only: cheap, and fails before training.
    if volumes.is_volume(image_path) != volume:
      raise DataError(
        f'{image_path} is {"an image" if volume else "a volume"} but {pairs[0][1].name} is '
        f'{"a volume" if volume else "an image"}; a folder dataset holds images or volumes, not both'
      )
    if volume:
      image_size, mask_size = volumes.shape_of(image_path, 'image'), volumes.shape_of(mask_path, 'mask')
    else:
      image_size, mask_size = _size(image_path, 'image'), _size(mask_path, 'mask')
    if image_size != mask_size:
      raise DataError(
        f'{stem}: image {image_path.name} is {"x".join(map(str, image_size))} but mask {mask_path.name} is '
        f'{"x".join(map(str, mask_size))}; they must match'
      )
  label_map = config.get('label_map') or {0: 0, 255: 1}

  def cache() -> tuple[pathlib.Path, str]:  # the folder itself; any change of a file changes the fingerprint
    files = [(stem, path.stat().st_size, path.stat().st_mtime_ns) for stem, path, _ in pairs]
    return root, f'{role}|' + hashlib.sha256(repr(files).encode()).hexdigest()

  name = f'folder {root} [{role}]'
  files = _FolderFiles(pairs, volume)
  return SegmentationSource(
    files, name, 'image', 'mask', label_lut(label_map), cache=cache, spatial_dims=3 if volume else 2
  )


def open_split(config: Any, role: str, *, channels: int | None = None) -> SegmentationSource:
  """The source for `role` of the dataset described by the data config section, its images
  checked for `channels` (default `data.channels`, else the first training image's) and, under
  'fixed' normalisation, for 8-bit pixels, under 'per_image' for channels that vary."""
  source = (open_folder if config.name == 'folder' else open_tfds)(config, role)
  spacing = config.get('spacing')
  if spacing is not None:
    spacing = tuple(check_spacing(spacing, 'data.spacing').tolist())
    if source.spatial_dims != 3:
      raise DataError(f'data.spacing={list(spacing)} is for volumes; {source.name} holds 2-D images: unset it')
    source.spacing = spacing  # before the channel count is read: a volume's record needs it
  channels = channels or config.get('channels') or image_channels(config, source if role == 'train' else None)
  kind = config.get('normalization') or 'fixed'
  return source.checked(channels, eight_bit=kind == 'fixed', varying=kind == 'per_image')


def image_channels(config: Any, train: SegmentationSource | None = None) -> int:
  """The channel count of the dataset's first training image (what `data.channels=None` means)."""
  train = train or (open_folder if config.name == 'folder' else open_tfds)(config, 'train')
  return int(train[0]['image'].shape[-1])


def num_classes(config: Any) -> int:
  """Classes, background included: from `data.label_map`, else the embedded builder's config."""
  label_map = config.get('label_map')
  if not label_map and config.name == 'folder':
    label_map = {0: 0, 255: 1}
  if not label_map:
    label_map = KNOWN_TFDS.get(base_name(config.name), TfdsDefaults()).label_map
  if label_map:
    return max(int(v) for v in dict(label_map).values()) + 1
  if base_name(config.name) in EMBEDDED:
    builder = tfds.builder(config.name, data_dir=data_dir(config))
    return builder.builder_config.num_classes
  raise DataError(f"dataset '{config.name}' has no label map; set data.label_map (mask value -> class id)")
