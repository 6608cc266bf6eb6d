"""TFDS builders of the embedded datasets, generated locally (no download, no TensorFlow).

`import resunet_jax.data` registers them, after which `tfds.data_source('synthetic_roads',
split='validation')` works once built; `resunet_jax.data.sources` builds them on first use
with `file_format='array_record'`. `synthetic_roads` and `synthetic_cells` hold images,
`synthetic_vessels` volumes with their voxel spacing.
"""

from __future__ import annotations

import dataclasses
import io
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from resunet_jax.data import synthetic

_SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """Size and task of an embedded dataset.

  Attributes:
    image_size: square side in pixels.
    render_size: side the scene is rendered at before its centre `image_size` square is cut
      out (None: `image_size`), so structures keep their size in pixels on smaller images.
    split_sizes: examples in train, validation and test.
    num_classes: classes in the mask, background included (2 for a binary task).
    seed: base seed; example i of split s is rendered from `(seed, s, i)`.
  """

  image_size: int = 128
  render_size: int | None = None
  split_sizes: tuple[int, int, int] = (2000, 200, 200)
  num_classes: int = 2
  seed: int = 0


def _png(array: np.ndarray) -> bytes:
  # Image features fed numpy arrays would call TensorFlow to encode: encode with Pillow.
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared machinery: features, splits and deterministic generation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}  # noqa: RUF012 (TFDS reads a class attribute)
  render: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
          'mask': tfds.features.Tensor(shape=(size, size), dtype=np.uint8),
          'id': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'mask'),
      metadata=tfds.core.MetadataDict(num_classes=self.builder_config.num_classes),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in _SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    count = config.split_sizes[_SPLITS.index(split)]
    # A stable per-dataset salt, so roads and cells never share random streams.
    salt = zlib.crc32(self.name.encode())
    for index in range(count):
      rng = np.random.default_rng([config.seed, salt, _SPLITS.index(split), index])
      image, mask = self.render(rng, config.render_size or config.image_size)
      if config.render_size:
        top = (config.render_size - config.image_size) // 2
        window = np.s_[top : top + config.image_size, top : top + config.image_size]
        image, mask = image[window], mask[window]
      if config.num_classes == 2:
        mask = (mask > 0).astype(np.uint8)
      key = f'{split}_{index:05d}'
      yield key, {'image': _png(image), 'mask': mask, 'id': key}


def _configs(tasks: dict[str, int]) -> list[SyntheticConfig]:
  configs = []
  for task, num_classes in tasks.items():
    prefix = '' if task == 'binary' else f'{task}_'
    configs.append(
      SyntheticConfig(
        name=f'{prefix}default' if prefix else 'default',
        description=f'{task}, 128x128, 2000/200/200 examples',
        num_classes=num_classes,
      )
    )
    configs.append(
      SyntheticConfig(
        name=f'{prefix}size64',
        description=f'{task}, 64x64, 2000/200/200 examples (CPU-sized experiments)',
        image_size=64,
        num_classes=num_classes,
      )
    )
    configs.append(
      SyntheticConfig(
        name=f'{prefix}size32',
        description=f'{task}, the centre 32x32 of 64x64 scenes, 2000/200/200 examples (the CPU study)',
        image_size=32,
        render_size=64,
        num_classes=num_classes,
      )
    )
    configs.append(
      SyntheticConfig(
        name=f'{prefix}small',
        description=f'{task}, 64x64, 64/16/16 examples (for tests)',
        image_size=64,
        split_sizes=(64, 16, 16),
        num_classes=num_classes,
      )
    )
  return configs


class SyntheticRoads(_SyntheticBuilder):
  """Synthetic aerial road extraction: thin road networks among same-coloured distractors.

  Dataset card.
  - Task: binary segmentation, road (1) vs background (0), as in road extraction from aerial
    images (Zhang, Liu & Wang, "Road Extraction by Deep Residual U-Net", IEEE GRSL 2018).
  - Content: smooth roads 1-5 px wide (every image has a 1 px road) that cross and branch,
    partly occluded by tree crowns (occluded road stays road in the mask), on textured fields
    with buildings and parking lots in the same greys, plus sensor noise.
  - Difficulty: the best single global intensity threshold reaches a Dice of about 0.39;
    roads are about 6% of pixels.
  - Configs: `default` 128x128, 2000/200/200; `size64` 64x64, 2000/200/200 (rendered at
    that size, so 1 px roads stay 1 px; the CPU-sized ablation grids use it); `size32` the
    centre 32x32 of the `size64` scenes, 2000/200/200 (studies/skip_residual/PROTOCOL.md); `small`
    64x64, 64/16/16.
  - Features: `image` uint8 [H, W, 3] (PNG), `mask` uint8 [H, W] class ids, `id` text.
  - Generation: deterministic from the config's seed; no download.
  """

  BUILDER_CONFIGS = _configs({'binary': 2})  # noqa: RUF012
  render = staticmethod(synthetic.render_roads)


class SyntheticCells(_SyntheticBuilder):
  """Synthetic microscopy: touching, overlapping cells under uneven illumination.

  Dataset card.
  - Task: cell segmentation in the setting of the U-Net paper (Ronneberger, Fischer & Brox,
    MICCAI 2015): `default` is binary (cell 1, background 0); `three_class_default` separates
    background (0), cell interior (1) and cell boundary (2), the 1-2 px borders between
    touching cells included, which the paper's weighted loss targets.
  - Content: 6-13 irregular cells per image, placed to touch and overlap, only slightly
    brighter than the background, with granular texture and faint membranes; a smooth
    illumination field varies about threefold across the image.
  - Difficulty: the best single global intensity threshold reaches a Dice of about 0.24
    (binary); cells are about 10% of pixels.
  - Configs: `default`, `three_class_default` 128x128, 2000/200/200; `size64`,
    `three_class_size64` 64x64, 2000/200/200; `size32`, `three_class_size32` the centre 32x32
    of the `size64` scenes (cells keep their size in pixels); `small`, `three_class_small`
    64x64, 64/16/16.
  - Features: `image` uint8 [H, W, 3] (PNG), `mask` uint8 [H, W] class ids, `id` text.
  - Generation: deterministic from the config's seed; no download.
  """

  BUILDER_CONFIGS = _configs({'binary': 2, 'three_class': 3})  # noqa: RUF012
  render = staticmethod(synthetic.render_cells)


@dataclasses.dataclass
class VolumeConfig(tfds.core.BuilderConfig):
  """Size and sampling of an embedded volume dataset.

  Attributes:
    size: cube side the scene is rendered at, in voxels of 1 mm.
    slice_step: every `slice_step`-th slice of the first axis is kept, so the volume is
      `[size / slice_step, size, size]` with spacing `(slice_step, 1, 1)` mm (anisotropic, as
      most CT and MRI series are, when above 1).
    split_sizes: examples in train, validation and test.
    num_classes: classes in the mask, background included.
    seed: base seed; example i of split s is rendered from `(seed, s, i)`.
  """

  size: int = 64
  slice_step: int = 1
  split_sizes: tuple[int, int, int] = (160, 20, 20)
  num_classes: int = 2
  seed: int = 0

  @property
  def shape(self) -> tuple[int, int, int]:
    return (-(-self.size // self.slice_step), self.size, self.size)


class SyntheticVessels(tfds.core.GeneratorBasedBuilder):
  """Synthetic angiography: trees of thin tubes in noisy volumes (the 3D analogue of the roads).

  Dataset card.
  - Task: binary segmentation of vessels (1) against background (0) in volumes, as in vessel and
    neurite segmentation of angiography, light-sheet and EM stacks (the setting clDice was made
    for: Shit et al., CVPR 2021).
  - Content: 3-5 trunks of radius 1-3.5 voxels (one of radius 1 in every volume) entering through
    a face, each with 2-4 thinner branches; tubes only slightly brighter than a background whose
    intensity drifts smoothly, blob distractors in the tubes' intensity, Gaussian noise.
  - Difficulty: the best single global intensity threshold reaches a Dice of about 0.1-0.3;
    vessels are about 1% of voxels (tests/data/test_volume_data.py measures both).
  - Configs: `default` 64^3 at 1 mm, 160/20/20; `anisotropic` the same scenes with every second
    slice, 32x64x64 at (2, 1, 1) mm (the case nnU-Net's anisotropic pooling is for); `small`
    32^3, 16/4/4 (for tests).
  - Features: `image` uint8 [D, H, W, 1], `mask` uint8 [D, H, W] class ids, `spacing` float32 [3]
    (mm per voxel along D, H, W), `id` text.
  - Generation: deterministic from the config's seed; no download.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}  # noqa: RUF012 (TFDS reads a class attribute)
  BUILDER_CONFIGS = [  # noqa: RUF012
    VolumeConfig(name='default', description='64^3 at 1 mm, 160/20/20 volumes'),
    VolumeConfig(name='anisotropic', description='32x64x64 at (2, 1, 1) mm, 160/20/20 volumes', slice_step=2),
    VolumeConfig(name='small', description='32^3 at 1 mm, 16/4/4 volumes (for tests)', size=32, split_sizes=(16, 4, 4)),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    shape = self.builder_config.shape
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Tensor(shape=(*shape, 1), dtype=np.uint8),
          'mask': tfds.features.Tensor(shape=shape, dtype=np.uint8),
          'spacing': tfds.features.Tensor(shape=(3,), dtype=np.float32),
          'id': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'mask'),
      metadata=tfds.core.MetadataDict(num_classes=2),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in _SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    salt = zlib.crc32(self.name.encode())
    spacing = np.asarray([config.slice_step, 1, 1], np.float32)
    for index in range(config.split_sizes[_SPLITS.index(split)]):
      rng = np.random.default_rng([config.seed, salt, _SPLITS.index(split), index])
      image, mask = synthetic.render_vessels(rng, config.size)
      step = np.s_[:: config.slice_step]
      key = f'{split}_{index:05d}'
      yield key, {'image': image[step, ..., None], 'mask': mask[step], 'spacing': spacing, 'id': key}
