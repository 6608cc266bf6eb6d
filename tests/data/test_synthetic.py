"""The embedded datasets: determinism, difficulty (threshold baseline) and fine structures."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from resunet_jax import data
from resunet_jax.data import baseline, builders, synthetic


def _examples(name, split='validation'):
  """The records the builder writes for `split`, generated in memory (default config)."""
  builder = tfds.builder(name, data_dir='/nonexistent')  # Never prepared: generation only.
  return [(synthetic_image(record), record['mask']) for _, record in builder._generate_examples(split)]


def synthetic_image(record):
  from io import BytesIO

  from PIL import Image

  return np.asarray(Image.open(BytesIO(record['image'])))


@pytest.mark.parametrize('render', [synthetic.render_roads, synthetic.render_cells])
def test_rendering_is_deterministic(render):
  a, b = render(np.random.default_rng(7), 64), render(np.random.default_rng(7), 64)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], render(np.random.default_rng(8), 64)[0])


@pytest.mark.parametrize('name', ['synthetic_roads', 'synthetic_cells'])
def test_best_global_threshold_scores_at_most_half(name):
  pairs = _examples(name)
  assert len(pairs) == 200
  dice, where = baseline.best_threshold_dice((image, mask > 0) for image, mask in pairs)
  assert dice <= 0.5, f'{name}: a global threshold ({where}) reaches Dice {dice:.3f}'
  # Predicting everything foreground must not be a shortcut either.
  fraction = np.mean([(mask > 0).mean() for _, mask in pairs])
  assert 2 * fraction / (1 + fraction) <= 0.5


def test_threshold_baseline_finds_a_separable_threshold():
  image = np.zeros((8, 8, 3), np.uint8)
  image[:4] = 200
  dice, where = baseline.best_threshold_dice([(image, image[..., 0] > 100)])
  assert dice == 1.0 and where.startswith('grey >')


def _thin_fraction(mask):
  """Fraction of foreground pixels removed by a 3x3 opening: structures at most 2 px wide."""
  foreground = mask > 0
  return (foreground & ~ndimage.binary_opening(foreground, np.ones((3, 3)))).sum() / max(foreground.sum(), 1)


def test_roads_have_one_and_two_pixel_structures():
  pairs = _examples('synthetic_roads')[:50]
  thin = [_thin_fraction(mask) for _, mask in pairs]
  assert min(thin) > 0.0  # every image has 1-2 px road
  assert np.mean(thin) > 0.2
  widths = set()
  for _, mask in pairs[:10]:
    runs = np.diff(np.flatnonzero(np.diff(np.pad(mask[64], 1)) != 0))[::2]
    widths |= set(runs.tolist())
  assert {1, 2} <= widths


def test_cell_boundaries_are_thin_and_separate_touching_cells():
  pairs = _examples('synthetic_cells/three_class_default')[:50]
  for _, mask in pairs:
    assert set(np.unique(mask)) <= {0, 1, 2}
    assert _thin_fraction(mask == 2) > 0.8  # 1-2 px wide, but for 3x3 blocks where cells meet
  # Touching cells: some boundary pixels have cell interior on both sides.
  touching = 0
  for _, mask in pairs:
    interior_both = (np.roll(mask, 1, 0) == 1) & (np.roll(mask, -1, 0) == 1) & (mask == 2)
    touching += int(interior_both.sum())
  assert touching > 0


def test_builders_write_what_tfds_data_source_reads(tfds_dir):
  for name, classes in (('synthetic_roads/small', {0, 1}), ('synthetic_cells/three_class_small', {0, 1, 2})):
    source = tfds.data_source(name, split='validation', data_dir=tfds_dir, download=False)
    assert len(source) == 16
    record = source[0]
    assert record['image'].shape == (64, 64, 3) and record['image'].dtype == np.uint8
    assert record['mask'].shape == (64, 64) and record['mask'].dtype == np.uint8
    seen = set().union(*(np.unique(source[i]['mask']).tolist() for i in range(len(source))))
    assert seen == classes
    ids = {source[i]['id'] for i in range(len(source))}
    assert len(ids) == 16 and all(i.startswith(b'validation_') for i in ids)


def test_builds_are_identical_across_directories(tfds_dir, tmp_path):
  data.sources.prepare_embedded('synthetic_roads/small', str(tmp_path))
  a = tfds.data_source('synthetic_roads/small', split='test', data_dir=tfds_dir, download=False)
  b = tfds.data_source('synthetic_roads/small', split='test', data_dir=str(tmp_path), download=False)
  by_id = {r['id']: r for r in (a[i] for i in range(len(a)))}
  for record in (b[i] for i in range(len(b))):
    np.testing.assert_array_equal(record['image'], by_id[record['id']]['image'])
    np.testing.assert_array_equal(record['mask'], by_id[record['id']]['mask'])


@pytest.mark.parametrize('builder', [builders.SyntheticRoads, builders.SyntheticCells])
def test_size32_is_the_centre_of_the_size64_scenes(builder, tmp_path):
  def first(config):
    examples = builder(config=config, data_dir=str(tmp_path))._generate_examples('validation')
    return next(iter(examples))[1]

  small, large = first('size32'), first('size64')
  decode = lambda png: np.asarray(Image.open(io.BytesIO(png)))  # noqa: E731
  assert decode(small['image']).shape == (32, 32, 3) and small['mask'].shape == (32, 32)
  np.testing.assert_array_equal(decode(small['image']), decode(large['image'])[16:48, 16:48])
  np.testing.assert_array_equal(small['mask'], large['mask'][16:48, 16:48])


def test_builder_configs_and_metadata():
  configs = {c.name: c for c in builders.SyntheticCells.BUILDER_CONFIGS}
  assert set(configs) == {
    'default',
    'size64',
    'size32',
    'small',
    'three_class_default',
    'three_class_size64',
    'three_class_size32',
    'three_class_small',
  }
  assert (configs['size64'].image_size, configs['size64'].split_sizes) == (64, (2000, 200, 200))
  assert configs['default'].split_sizes == (2000, 200, 200) and configs['default'].image_size == 128
  assert configs['three_class_default'].num_classes == 3
