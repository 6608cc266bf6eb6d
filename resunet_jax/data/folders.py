"""Writes a dataset's splits as an image folder of a chosen bit depth and channel count.

The folder is what `data.name='folder'` reads (`ROOT/{train,validation,test}/{images,masks}`), so
an embedded dataset can stand in for a microscope's 16-bit or float output: the same images at
another depth and channel count, to try a format or compare normalisations on the same content.

Pixel rules, from an 8-bit RGB image `x`: channels are taken from (R, G, B, grey) in turn
(1: grey; 3: RGB; 4: RGB and grey), grey the rounded mean of R, G, B. Depths: 8 as stored; 12
`x * 16` (0..4080, uint16, how a 12-bit camera fills a 16-bit file); 16 `x * 257` (0..65535);
'float' `x / 127.5 - 1` (float32, -1..1). 8-bit images of 1, 3 or 4 channels are PNGs (grey,
RGB, RGBA), all others TIFFs. Masks are 8-bit PNGs: 0 and 255 for a binary dataset (the folder
source's default label map), class ids otherwise.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

from resunet_jax.data import sources
from resunet_jax.errors import DataError

DEPTHS = ('8', '12', '16', 'float')


def convert(image: np.ndarray, depth: str, channels: int) -> np.ndarray:
  """An 8-bit RGB image `[H, W, 3]` at `depth` with `channels` channels (module doc)."""
  if depth not in DEPTHS:
    raise DataError(f"depth '{depth}' is not one of {', '.join(DEPTHS)}")
  if image.dtype != np.uint8 or image.shape[-1] != 3:
    raise DataError(f'convert takes 8-bit RGB images, got {image.dtype} {image.shape}')
  grey = np.round(image.astype(np.float32).mean(-1, keepdims=True)).astype(np.uint8)
  planes = np.concatenate([image, grey], -1)
  image = planes[..., [c % 4 for c in range(channels)]]
  if depth == '8':
    return image
  if depth == 'float':
    return image.astype(np.float32) / 127.5 - 1.0
  return image.astype(np.uint16) * (16 if depth == '12' else 257)


def write_image(path: pathlib.Path, image: np.ndarray) -> pathlib.Path:
  """`image` `[H, W, C]` as a PNG (8-bit, 1/3/4 channels) or a TIFF (anything else); the path written."""
  if image.dtype == np.uint8 and image.shape[-1] in (1, 3, 4):
    path = path.with_suffix('.png')
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
  else:
    path = path.with_suffix('.tif')
    if image.shape[-1] == 1:
      tifffile.imwrite(path, image[..., 0], photometric='minisblack')
    else:  # interleaved samples: without planarconfig, tifffile writes [H, W, C] as H pages of W x C
      tifffile.imwrite(path, image, photometric='rgb' if image.shape[-1] == 3 else 'minisblack', planarconfig='contig')
  return path


def write_folder(
  config: Any,
  root: str | pathlib.Path,
  *,
  depth: str = '16',
  channels: int = 3,
  roles: Sequence[str] = sources.SPLIT_ROLES,
  limit: int | None = None,
) -> pathlib.Path:
  """Writes the splits `roles` of the dataset of data config `config` under `root`.

  Args:
    config: a data config section naming an 8-bit RGB dataset (an embedded one, say).
    root: the folder to write (`root/<role>/images`, `root/<role>/masks`).
    depth: one of `DEPTHS`.
    channels: image channels, 1 or more.
    roles: the splits to write.
    limit: at most this many examples per split (the first ones).

  Returns:
    `root`.
  """
  if channels < 1:
    raise DataError(f'channels={channels} must be at least 1')
  root = pathlib.Path(root)
  binary = sources.num_classes(config) == 2
  for role in roles:
    source = sources.open_split(config, role)
    images, masks = root / role / 'images', root / role / 'masks'
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    count = len(source) if limit is None else min(limit, len(source))
    for index in tqdm(range(count), desc=f'{role} -> {root / role}', unit='image', leave=False):
      record = source[index]
      stem = f'{index:05d}'
      write_image(images / stem, convert(record['image'], depth, channels))
      Image.fromarray(record['mask'] * np.uint8(255) if binary else record['mask']).save(masks / f'{stem}.png')
  return root
