"""Images as they come: 16-bit, float and 1..N-channel files reach the model whole, normalised from
the training data (resunet_jax/data/normalization.py), train, and predict with the run's numbers."""

import json
import shutil
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from resunet_jax import data
from resunet_jax.data import folders, normalization
from resunet_jax.errors import DataError
from resunet_jax.training import checkpoint

# name: (depth, channels, normalisation). 16-bit reaches 65,535 (x257); float is -1..1.
FORMATS = {
  'uint16x3': ('16', 3, 'dataset_zscore'),
  'floatx4': ('float', 4, 'percentile'),
  'uint12x1': ('12', 1, 'per_image'),
}
PER_SPLIT = 16
SAME_CONTENT = {'uint8x3': ('8', 3), 'uint12x3': ('12', 3)}  # the 8-bit original and its 12-bit copy (x16)


@pytest.fixture(scope='session')
def format_folders(shared, tfds_dir):
  """The small roads dataset written at each of `FORMATS` (read only: tests take a copy)."""

  def build(root):
    config = data.default_config()
    config.name, config.data_dir = 'synthetic_roads/small', tfds_dir
    for name, (depth, channels) in {**{k: v[:2] for k, v in FORMATS.items()}, **SAME_CONTENT}.items():
      folders.write_folder(config, root / name, depth=depth, channels=channels, limit=PER_SPLIT)
    for role in data.sources.SPLIT_ROLES:  # a saturated corner, as microscopes write: the top of the 16-bit range
      path = root / 'uint16x3' / role / 'images' / '00001.tif'
      pixels = tifffile.imread(path)
      pixels[:6, :6] = 65535
      tifffile.imwrite(path, pixels, photometric='rgb')

  return shared.build('formats', build)


def _config(root, kind, **fields):
  config = data.default_config()
  config.name, config.folder, config.normalization, config.image_size = 'folder', str(root), kind, 64
  config.read_threads, config.prefetch = 2, 4
  for key, value in fields.items():
    config[key] = value
  return config


def _raw(root, role):
  files = sorted((root / role / 'images').iterdir())
  return np.stack([data.sources.read_image(f) for f in files]).astype(np.float64)


def _train(commands, workdir, root, kind):
  command = [
    sys.executable,
    'experiments/train.py',
    '--config=experiments/configs/quick.py',
    '--config.data.name=folder',
    f'--config.data.folder={root}',
    f'--config.data.normalization={kind}',
    f'--workdir={workdir}',
  ]
  result = commands.run(command)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r['dice'] for r in lines if r['split'] == 'validation']


def test_files_keep_their_depth_and_channels(format_folders, tfds_dir, tmp_path):
  ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
  Image.fromarray(ramp).save(tmp_path / 'grey16.png')  # Pillow's I;16 mode
  np.testing.assert_array_equal(data.sources.read_image(tmp_path / 'grey16.png'), ramp[..., None])
  config = data.default_config()
  config.name, config.data_dir = 'synthetic_roads/small', tfds_dir
  rgb = data.open_split(config, 'train')[0]['image']
  wide = data.sources.read_image(format_folders / 'uint16x3' / 'train' / 'images' / '00000.tif')
  assert wide.dtype == np.uint16 and wide.shape == (64, 64, 3)
  np.testing.assert_array_equal(wide, rgb.astype(np.uint16) * 257)
  for role in data.sources.SPLIT_ROLES:
    assert _raw(format_folders / 'uint16x3', role).max() == 65535  # the full 16-bit range
  floats = data.sources.read_image(format_folders / 'floatx4' / 'train' / 'images' / '00000.tif')
  assert floats.dtype == np.float32 and floats.shape == (64, 64, 4) and floats.min() < 0
  np.testing.assert_allclose(floats[..., :3], rgb / 127.5 - 1, atol=1e-6)
  grey = data.sources.read_image(format_folders / 'uint12x1' / 'train' / 'images' / '00000.tif')
  assert grey.shape == (64, 64, 1) and grey.max() <= 4080 and grey.max() > 255


@pytest.mark.parametrize('name', list(FORMATS))
def test_the_pipeline_yields_the_full_range_normalised_by_the_training_split(name, format_folders, shared):
  depth, channels, kind = FORMATS[name]
  root = shared.copy(format_folders / name)
  config = _config(root, kind)
  info = data.dataset_info(config)
  assert info.image_shape == (64, 64, channels)
  train, validation = _raw(root, 'train'), _raw(root, 'validation')
  norm = info.normalization
  if kind == 'dataset_zscore':  # every pixel of the training split
    np.testing.assert_allclose(norm.mean, train.mean((0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(norm.std, train.std((0, 1, 2)), rtol=1e-9)
  if kind == 'percentile':  # 64x64 images: fewer pixels than are sampled, so all of them
    pixels = train.reshape(-1, channels)
    low, high = np.percentile(pixels, normalization.PERCENTILES, axis=0)
    np.testing.assert_allclose((norm.low, norm.high), (low, high), rtol=1e-6)
    np.testing.assert_allclose(norm.mean, np.clip(pixels, low, high).mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.std, np.clip(pixels, low, high).std(0), rtol=1e-6)  # of the clipped pixels
  (batch,) = data.make_pipeline(config, 'validation', batch_size=PER_SPLIT, seed=0, train=False)
  assert batch['image'].shape == (PER_SPLIT, 64, 64, channels)
  if kind == 'per_image':
    expected = (validation - validation.mean((1, 2), keepdims=True)) / validation.std((1, 2), keepdims=True)
  else:
    clipped = np.clip(validation, norm.low, norm.high) if kind == 'percentile' else validation
    expected = (clipped - np.asarray(norm.mean)) / np.asarray(norm.std)
    if kind == 'dataset_zscore':  # undone, the batch is the file's pixels: up to 65,535, nothing saturated
      np.testing.assert_allclose(norm.unnormalise(batch['image']), validation, atol=0.05)
      assert validation.max() == 65535
  np.testing.assert_allclose(batch['image'], expected, atol=1e-4)
  train_batch = next(iter(data.make_pipeline(config, 'train', batch_size=8, seed=0, train=True)))
  image = train_batch['image']
  assert image.shape == (8, 64, 64, channels) and np.isfinite(image).all()
  assert len(np.unique(image)) > 1000 and 0.3 < image.std() < 3  # augmented, still spread, nothing saturated
  dtype = 'float32' if depth == 'float' else 'uint16'  # the old saturation case is refused
  with pytest.raises(DataError, match=rf"{dtype} pixels \(.*\); data.normalization='fixed' .* would saturate"):
    data.dataset_info(_config(root, 'fixed'))
  cache = list(root.glob(f'normalization-{kind}-*.json'))
  assert len(cache) == (kind != 'per_image')


def test_statistics_are_cached_beside_the_data_and_refreshed_when_files_change(format_folders, shared, monkeypatch):
  root = shared.copy(format_folders / 'uint16x3')
  config = _config(root, 'dataset_zscore')
  first = data.resolve_normalization(config)
  calls = []
  compute = normalization.compute
  monkeypatch.setattr(normalization, 'compute', lambda *a, **k: calls.append(1) or compute(*a, **k))
  assert data.resolve_normalization(config) == first and not calls  # read from the cache
  path = root / 'train' / 'images' / '00000.tif'
  tifffile.imwrite(path, np.full((64, 64, 3), 60000, np.uint16), photometric='rgb')
  changed = data.resolve_normalization(config)
  assert calls == [1] and changed.mean[0] > first.mean[0]  # a changed file is seen
  for cached in root.glob('normalization-*.json'):
    cached.write_text('{not json')
  assert data.resolve_normalization(config) == changed and calls == [1, 1]  # a corrupt cache is recomputed
  config.stats = {'mean': [1.0, 2.0, 3.0], 'std': [4.0, 5.0, 6.0]}
  assert data.resolve_normalization(config).mean == (1.0, 2.0, 3.0) and calls == [1, 1]  # recorded: never recomputed


@pytest.mark.parametrize('name', list(FORMATS))
def test_a_quick_run_trains_on_each_format(name, format_folders, shared, commands, tmp_path):
  depth, channels, kind = FORMATS[name]
  root = shared.copy(format_folders / name)
  workdir = tmp_path / 'run'
  dice = _train(commands, workdir, root, kind)
  assert np.isfinite(dice).all()
  saved = json.loads((workdir / 'config.json').read_text())['data']
  assert saved['channels'] == channels and saved['normalization'] == kind
  assert (saved['stats'] is None) == (kind == 'per_image')
  ckpt = checkpoint.Checkpoints(workdir / 'checkpoints')
  assert ckpt.read_config()['data']['stats'] == saved['stats']  # the checkpoint carries them too
  ckpt.close()
  if name != 'uint16x3':
    return
  # Evaluation and prediction use the run's statistics: with the training files unreadable, then the
  # data and its cache gone, they still run.
  for path in (root / 'train' / 'images').iterdir():
    path.write_bytes(b'not a tiff')
  result = commands.run([sys.executable, 'experiments/evaluate.py', f'--workdir={workdir}', '--split=test'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((workdir / 'eval_test.json').read_text())['metrics']['dice']['mean'] >= 0
  tiles = _raw(root, 'test').astype(np.uint16)
  mosaic = np.concatenate([np.concatenate(list(tiles[:3]), 1), np.concatenate(list(tiles[3:6]), 1)], 0)[:101, :157]
  images = tmp_path / 'images'
  images.mkdir()
  tifffile.imwrite(images / 'wide.tif', mosaic, photometric='rgb')
  shutil.rmtree(root)
  out = tmp_path / 'out'
  result = commands.run(
    [sys.executable, 'experiments/predict.py', f'--workdir={workdir}', f'--input={images}', f'--output={out}']
  )
  assert result.returncode == 0, result.stderr[-3000:]
  mask = np.asarray(Image.open(out / 'wide_mask.png'))
  overlay = np.asarray(Image.open(out / 'wide_overlay.png'))
  assert mask.shape == (101, 157) and overlay.shape == (101, 157, 3)
  assert 40 < overlay.mean() < 215 and overlay.std() > 20  # a picture, neither black nor saturated white


def test_a_12_bit_copy_trains_as_its_8_bit_original(format_folders, shared, commands, tmp_path):
  """The same content at 12 bits, z-scored by its own statistics, trains to the same Dice (same seeds)."""
  dice = {
    name: _train(commands, tmp_path / name, shared.copy(format_folders / name), 'dataset_zscore')
    for name in SAME_CONTENT
  }
  assert len(dice['uint8x3']) == 2 and np.abs(np.subtract(dice['uint12x3'], dice['uint8x3'])).max() <= 0.02, dice


def test_tfds_records_of_16_bits_and_4_channels_are_kept_whole():
  """A TFDS data source yields dicts of arrays: the same checks apply as to files."""
  image = np.linspace(0, 65535, 8 * 8 * 4).reshape(8, 8, 4).astype(np.uint16)
  base = [{'image': image, 'mask': np.zeros((8, 8, 1), np.uint8), 'id': b'a'}]
  source = data.sources.SegmentationSource(base, 'tfds[train]', 'image', 'mask', None)
  record = source.checked(4, eight_bit=False)[0]
  assert record['image'].dtype == np.float32 and record['image'].max() == 65535 and record['id'] == 'a'
  with pytest.raises(DataError, match='tfds\\[train\\] a: image has 4 channels but data.channels is 3'):
    source.checked(3, eight_bit=False)[0]
