"""Folder datasets of another layout (`data.folder_layout`), as MoNuSeg's, with a hint on missing data."""

import pathlib
import runpy

import numpy as np
import pytest
import tifffile
from PIL import Image

from resunet_jax import data
from resunet_jax.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPLITS = {'Train_Folder': ('a', 'b'), 'Val_Folder': ('c',), 'Test_Folder': ('d', 'e')}


def _monuseg_like(root):
  """MoNuSeg's layout in miniature: {Train,Val,Test}_Folder/{img,labelcol}, test images as TIFF."""
  rng = np.random.default_rng(0)
  for split, stems in SPLITS.items():
    (root / split / 'img').mkdir(parents=True)
    (root / split / 'labelcol').mkdir(parents=True)
    for stem in stems:
      image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
      if split == 'Test_Folder':
        tifffile.imwrite(root / split / 'img' / f'{stem}.tif', image, photometric='rgb')
      else:
        Image.fromarray(image).save(root / split / 'img' / f'{stem}.png')
      Image.fromarray(np.where(rng.random((40, 40)) < 0.3, 255, 0).astype(np.uint8)).save(
        root / split / 'labelcol' / f'{stem}.png'
      )
  return root


def _config(folder):
  config = runpy.run_path(str(ROOT / 'experiments/configs/monuseg.py'))['get_config']()
  config.data.folder = str(folder)
  return config.data


def test_the_monuseg_config_reads_its_layout_split_by_split(tmp_path):
  config = _config(_monuseg_like(tmp_path / 'monuseg'))
  for role, stems in zip(('train', 'validation', 'test'), SPLITS.values(), strict=True):
    source = data.open_split(config, role)
    assert [source[i]['id'] for i in range(len(source))] == list(stems)
    record = source[0]
    assert record['image'].shape == (40, 40, 3) and set(np.unique(record['mask'])) <= {0, 1}  # 255 -> class 1


def test_missing_data_names_where_to_get_it(tmp_path):
  with pytest.raises(DataError, match=r'does not exist; .*McGregorWwww/UCTransNet, datasets/MoNuSeg; set MONUSEG_DIR'):
    data.open_split(_config(tmp_path / 'absent'), 'train')
  (tmp_path / 'half' / 'Train_Folder' / 'img').mkdir(parents=True)
  with pytest.raises(DataError, match=r'Train_Folder/labelcol is missing; a folder dataset has img/ and labelcol/'):
    data.open_split(_config(tmp_path / 'half'), 'train')


def test_the_paper_protocol_resizes_to_224_and_an_unknown_one_is_refused():
  load = runpy.run_path(str(ROOT / 'experiments/configs/monuseg.py'))['get_config']
  paper = load('paper')
  assert paper.data.image_size == 224 and paper.data.evaluation == 'resize' and not paper.data.patch_size
  native = load()
  assert native.data.patch_size == 256 and native.data.evaluation == 'whole'
  with pytest.raises(ValueError, match='monuseg.py:tiles is not a protocol'):
    load('tiles')
