"""The Grain pipeline: determinism, exact resume, epochs, sharding, augmentation alignment."""

import itertools

import numpy as np
import pytest

from resunet_jax import data


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['id'], y['id'])
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['mask'], y['mask'])


def _train(config, seed=0, batch_size=8, **kwargs):
  return iter(data.make_pipeline(config, 'train', batch_size=batch_size, seed=seed, train=True, **kwargs))


def test_batches_have_the_promised_shapes_and_values(data_config):
  batch = next(_train(data_config))
  assert batch['image'].shape == (8, 64, 64, 3) and batch['image'].dtype == np.float32
  assert batch['mask'].shape == (8, 64, 64) and batch['mask'].dtype == np.int32
  assert set(np.unique(batch['mask'])) <= {0, 1}
  assert batch['valid'].tolist() == [1.0] * 8
  # (x / 255 - 0.5) / 0.25 spans [-2, 2].
  assert batch['image'].min() >= -2.0 and batch['image'].max() <= 2.0


def test_same_seed_same_batches_other_seed_other_batches(data_config):
  _assert_batches_equal(_take(_train(data_config), 3), _take(_train(data_config), 3))
  other = next(_train(data_config, seed=1))
  assert not np.array_equal(other['image'], next(_train(data_config))['image'])


@pytest.mark.parametrize('stop', [3, 7])  # 8 batches per epoch: 7 resumes across the boundary.
def test_resume_from_saved_state_is_exact(data_config, stop):
  data_config.augment.elastic_prob = 0.5  # every random transform takes part
  iterator = _train(data_config)
  _take(iterator, stop)
  state = iterator.get_state()
  expected = _take(iterator, 4)
  resumed = _train(data_config)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), expected)


def test_each_epoch_is_a_new_permutation(data_config):
  iterator = _train(data_config)
  epochs = [np.concatenate([b['id'] for b in _take(iterator, 8)]) for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == [f'train_{i:05d}' for i in range(64)]
  assert list(epochs[0]) != list(epochs[1])


def test_shards_are_disjoint_equal_and_cover():
  shards = [data.shard(10, i, 3) for i in range(3)]
  assert [len(indices) for indices, _ in shards] == [3, 3, 3]
  assert not set.intersection(*(set(indices) for indices, _ in shards))
  padded = [data.shard(10, i, 3, pad_to=6) for i in range(3)]
  valid = sorted(int(i) for indices, v in padded for i in indices[v == 1])
  assert valid == list(range(10)) and all(len(indices) == 6 for indices, _ in padded)


def test_evaluation_is_one_ordered_padded_pass(data_config):
  batches = list(data.make_pipeline(data_config, 'validation', batch_size=6, seed=0, train=False))
  assert [b['image'].shape[0] for b in batches] == [6, 6, 6]
  ids = np.concatenate([b['id'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  source = data.open_split(data_config, 'validation')
  assert list(ids[valid == 1]) == [source[i]['id'] for i in range(16)]  # the source's order
  assert sorted(ids[valid == 1]) == [f'validation_{i:05d}' for i in range(16)]


def test_the_fixed_rule_is_the_configs_mean_and_std_of_pixels_over_255(data_config):
  """An oracle for the default rule, written from its definition: each evaluation input is
  `(x / 255 - data.mean) / data.std` of the stored uint8 pixels, per channel (a plain `x / 255`,
  or the right values in the wrong channel order, fails)."""
  data_config.mean, data_config.std = (0.2, 0.5, 0.7), (0.1, 0.3, 0.2)  # distinct per channel
  (batch,) = data.make_pipeline(data_config, 'validation', batch_size=16, seed=0, train=False)
  source = data.open_split(data_config, 'validation')
  pixels = np.stack([np.asarray(source[i]['image'], np.float64) for i in range(16)])
  assert source[0]['image'].dtype == np.uint8 and pixels.max() > 128  # stored 8-bit pixels
  expected = (pixels / 255 - np.array(data_config.mean)) / np.array(data_config.std)
  np.testing.assert_allclose(batch['image'], expected, atol=1e-5)


def test_three_class_masks_stay_in_range(data_config):
  data_config.name = 'synthetic_cells/three_class_small'
  seen = set()
  for batch in _take(_train(data_config), 4):
    seen |= set(np.unique(batch['mask']).tolist())
  assert seen == {0, 1, 2}
  info = data.dataset_info(data_config)
  assert (info.num_classes, info.model_outputs, info.image_shape) == (3, 3, (64, 64, 3))
  assert info.split_sizes == {'train': 64, 'validation': 16, 'test': 16}


def _write_folder(root, count=12, size=(40, 48), seed=0):
  """Images whose mask is drawn from the image: class 1 where red > green."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  for i in range(count):
    blocks = rng.integers(0, 2, (size[0] // 8, size[1] // 8)).repeat(8, 0).repeat(8, 1)
    image = np.zeros((*size, 3), np.uint8)
    image[..., 0] = np.where(blocks, 200, 50)
    image[..., 1] = np.where(blocks, 50, 200)
    image[..., 2] = 120
    Image.fromarray(image).save(root / 'images' / f'img{i:02d}.png')
    Image.fromarray((blocks * 255).astype(np.uint8)).save(root / 'masks' / f'img{i:02d}.png')
  return root


def test_image_and_mask_stay_aligned_under_every_augmentation(data_config, tmp_path):
  config = data_config
  config.name, config.folder, config.holdout_percent, config.image_size = 'folder', str(_write_folder(tmp_path)), 0, 32
  config.augment.elastic_prob = 1.0
  config.augment.crop_scale = (0.3, 1.0)
  config.augment.brightness, config.augment.contrast, config.augment.gamma = 0.3, 0.3, 0.3
  agreement = []
  for batch in _take(_train(config, batch_size=4), 6):
    drawn = batch['image'][..., 0] > batch['image'][..., 1]  # the mask, read back from the pixels
    agreement.append((drawn == (batch['mask'] == 1)).mean())
    assert set(np.unique(batch['mask'])) <= {0, 1}
  # Pixels on block edges are blended by bilinear resampling; everything else must agree.
  assert min(agreement) > 0.95


def test_folder_holdout_split_is_stable_and_disjoint(data_config, tmp_path):
  config = data_config
  config.name, config.folder = 'folder', str(_write_folder(tmp_path, count=40))
  config.holdout_percent = 20
  ids = {
    role: [data.open_split(config, role)[i]['id'] for i in range(len(data.open_split(config, role)))]
    for role in ('train', 'validation', 'test')
  }
  assert sorted(itertools.chain(*ids.values())) == [f'img{i:02d}' for i in range(40)]
  assert ids['validation'] and ids['test'] and len(ids['train']) > len(ids['validation'])
  assert ids == {role: [data.open_split(config, role)[i]['id'] for i in range(len(ids[role]))] for role in ids}


def test_folder_with_split_folders(data_config, tmp_path):
  for split, count in (('train', 5), ('validation', 3)):
    _write_folder(tmp_path / split, count=count)
  config = data_config
  config.name, config.folder = 'folder', str(tmp_path)
  assert len(data.open_split(config, 'train')) == 5 and len(data.open_split(config, 'validation')) == 3
  record = data.open_split(config, 'validation')[0]
  assert record['image'].shape == (40, 48, 3) and set(np.unique(record['mask'])) <= {0, 1}


def test_mock_oxford_iiit_pet_end_to_end(data_config):
  import tensorflow_datasets as tfds

  def as_data_source(builder, split=None, **kwargs):
    rng = np.random.default_rng(abs(hash(str(split))) % 2**32)
    records = []
    for i in range(10):
      # Image and mask of different sizes, as TFDS mocks make them: each is resized alone.
      h, w = rng.integers(20, 60, 2)
      mh, mw = rng.integers(10, 50, 2)
      records.append(
        {
          'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
          'segmentation_mask': rng.integers(1, 4, (mh, mw, 1), dtype=np.uint8),
          'file_name': f'pet_{i}.jpg'.encode(),
        }
      )
    return records

  config = data_config
  config.name, config.data_dir = 'oxford_iiit_pet', None
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source):
    info = data.dataset_info(config)
    batch = next(_train(config, batch_size=4))
    evaluation = list(data.make_pipeline(config, 'test', batch_size=4, seed=0, train=False))
  assert info.num_classes == 3 and info.model_outputs == 3
  assert batch['image'].shape == (4, 64, 64, 3) and batch['mask'].shape == (4, 64, 64)
  assert set(np.unique(batch['mask'])) <= {0, 1, 2} and len(np.unique(batch['mask'])) == 3
  assert sum(b['valid'].sum() for b in evaluation) == 10 and evaluation[0]['id'][0] == 'pet_0.jpg'


def test_mock_pet_masks_outside_the_trimap_are_rejected(data_config):
  import tensorflow_datasets as tfds

  config = data_config
  config.name, config.data_dir = 'oxford_iiit_pet', None
  with (
    tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE),
    pytest.raises(data.sources.DataError, match=r'mask values \[.*\] are not in data.label_map \(maps \[1, 2, 3\]\)'),
  ):
    next(_train(config, batch_size=2))
