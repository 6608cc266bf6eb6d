"""Every data mistake the issue lists ends in one DataError line that says what to do."""

import numpy as np
import pytest
from PIL import Image

from resunet_jax import data
from resunet_jax.errors import DataError


def _folder(root, stems=('a', 'b', 'c'), mask_stems=None, size=(16, 16), mask_size=None, mask_value=255):
  (root / 'images').mkdir(parents=True, exist_ok=True)
  (root / 'masks').mkdir(exist_ok=True)
  for stem in stems:
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / 'images' / f'{stem}.png')
  for stem in stems if mask_stems is None else mask_stems:
    mask = np.zeros(mask_size or size, np.uint8)
    mask[:4] = mask_value
    Image.fromarray(mask).save(root / 'masks' / f'{stem}.png')
  return root


def _open(config, role='train', **fields):
  for key, value in fields.items():
    config[key] = value
  source = data.open_split(config, role)
  return [source[i] for i in range(len(source))]


def _one_line(excinfo):
  return '\n' not in str(excinfo.value)


@pytest.mark.parametrize(
  ('setup', 'fields', 'message'),
  [
    (None, {'name': 'folder'}, r"data.name='folder' needs data.folder=PATH"),
    (None, {'name': 'folder', 'folder': '/no/such/dir'}, r'data.folder /no/such/dir does not exist'),
    (lambda r: (r / 'images').mkdir(), {'name': 'folder'}, r'masks is missing'),
    (
      lambda r: _folder(r, stems=('a', 'b', 'c', 'd'), mask_stems=('a', 'x')),
      {'name': 'folder'},
      r'4 files in .* have no partner: b \(no mask\), c \(no mask\), d \(no mask\)',
    ),
    (lambda r: _folder(r, mask_size=(16, 12)), {'name': 'folder'}, r'a: image a.png is 16x16 but mask a.png is 12x16'),
    (
      lambda r: _folder(r, mask_value=7),
      {'name': 'folder'},
      r'mask values \[7\] are not in data.label_map \(maps \[0, 255\]\); add them to data.label_map',
    ),
    (lambda r: _folder(r, stems=('a',)), {'name': 'folder', 'holdout_percent': 50}, r"split 'train' .* is empty"),
    (
      lambda r: _folder(r),
      {'name': 'folder', 'label_map': {'zero': 0}},
      r"data.label_map entry 'zero': 0 is not an int-to-int mapping",
    ),
    (
      None,
      {'name': 'synthetic_roadz'},
      r"unknown dataset 'synthetic_roadz' \(did you mean 'synthetic_roads'\?\); known: synthetic_roads",
    ),
  ],
)
def test_bad_dataset_configs(data_config, tmp_path, setup, fields, message):
  if setup:
    setup(tmp_path)
  if fields.get('name') == 'folder' and 'folder' not in fields and setup:
    fields['folder'] = str(tmp_path)
  with pytest.raises(DataError, match=message) as excinfo:
    _open(data_config, **fields)
  assert _one_line(excinfo)


def test_unprepared_tfds_dataset_fails_without_touching_the_network(data_config, tmp_path):
  with pytest.raises(DataError, match=r"dataset 'mnist' split 'train' is not available in .*; prepare it") as excinfo:
    _open(data_config, name='mnist', data_dir=str(tmp_path), label_map={'0': 0})
  assert _one_line(excinfo)


def test_wrong_feature_keys_name_the_features(data_config):
  with pytest.raises(DataError, match=r"no feature 'label'; it has \['id', 'image', 'mask'\]"):
    _open(data_config, role='validation', mask_key='label')


def test_unreadable_image_and_colour_mask(data_config, tmp_path):
  root = _folder(tmp_path)
  (root / 'images' / 'a.png').write_bytes(b'')
  with pytest.raises(DataError, match=r'cannot read image .*a.png'):
    _open(data_config, name='folder', folder=str(root), holdout_percent=0)
  root = _folder(tmp_path / 'colour')
  Image.fromarray(
    np.dstack([np.zeros((16, 16), np.uint8), np.full((16, 16), 9, np.uint8)] * 1 + [np.zeros((16, 16), np.uint8)])
  ).save(root / 'masks' / 'b.png')
  with pytest.raises(DataError, match=r'mask .*b.png is colour'):
    _open(data_config, name='folder', folder=str(root), holdout_percent=0)


def test_batch_larger_than_the_shard(data_config):
  with pytest.raises(DataError, match=r'gives 32 examples per process, fewer than the per-process batch of 40'):
    data.make_pipeline(data_config, 'train', batch_size=40, seed=0, train=True, shard_index=0, shard_count=2)
  with pytest.raises(DataError, match='batch size 0 must be at least 1'):
    data.make_pipeline(data_config, 'train', batch_size=0, seed=0, train=True)
