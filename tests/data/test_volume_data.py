"""Volumes in the input pipeline: the embedded `synthetic_vessels`, NIfTI and TIFF-stack folders
with their voxel spacing, 3-D patches and flips, per-volume normalisation, and the one-line
errors of the inputs a volume run cannot take."""

import ml_collections
import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from resunet_jax import data
from resunet_jax.data import builders, synthetic, transforms, volumes
from resunet_jax.errors import DataError, UserError
from resunet_jax.training import loop


def _threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
  best = 0.0
  for level in range(0, 256, 4):
    guess = image >= level
    best = max(best, 2 * (guess & (mask > 0)).sum() / (guess.sum() + mask.sum()))
  return best


def test_vessel_volumes_are_deterministic_thin_sparse_and_not_solved_by_a_threshold():
  first = [synthetic.render_vessels(np.random.default_rng(seed), 48) for seed in range(4)]
  again = synthetic.render_vessels(np.random.default_rng(0), 48)
  np.testing.assert_array_equal(first[0][0], again[0])
  np.testing.assert_array_equal(first[0][1], again[1])
  for image, mask in first:
    assert image.shape == mask.shape == (48, 48, 48) and image.dtype == np.uint8
    assert 0.002 < mask.mean() < 0.08  # sparse, as vessels are
    assert _threshold_dice(image, mask) < 0.5  # intensity alone does not solve it
  assert builders.VolumeConfig(name='a', size=64, slice_step=2).shape == (32, 64, 64)


def _config(root, **extra) -> ml_collections.ConfigDict:
  config = data.default_config()
  config.name, config.folder, config.normalization = 'folder', str(root), 'per_image'
  config.label_map = {0: 0, 1: 1}
  config.patch_size, config.evaluation = 8, 'whole'
  for key, value in extra.items():
    config[key] = value
  return config


def _nifti_folder(root, shapes, zooms=(3.0, 1.0, 1.0)):
  rng = np.random.default_rng(0)
  for split, count in (('train', 3), ('validation', 1), ('test', 1)):
    for sub in ('images', 'masks'):
      (root / split / sub).mkdir(parents=True)
    for index in range(count):
      shape = shapes[index % len(shapes)]
      affine = np.diag([*zooms, 1.0])
      affine[:3, 3] = (10.0, -5.0, 3.0)
      voxels = rng.normal(100, 20, shape).astype(np.float32)
      mask = (rng.random(shape) < 0.2).astype(np.uint8)
      nib.save(nib.Nifti1Image(voxels, affine), root / split / 'images' / f'case{index}.nii.gz')
      nib.save(nib.Nifti1Image(mask, affine), root / split / 'masks' / f'case{index}.nii.gz')
  return root


def test_a_nifti_folder_gives_volumes_with_their_spacing_and_a_spacing_aware_network(tmp_path):
  root = _nifti_folder(tmp_path / 'ct', [(6, 12, 10), (5, 9, 12)])
  config = _config(root)
  source = data.open_split(config, 'train')
  record = source[0]
  assert source.spatial_dims == 3 and record['image'].shape == (6, 12, 10, 1) and record['mask'].shape == (6, 12, 10)
  np.testing.assert_array_equal(record['spacing'], [3.0, 1.0, 1.0])
  info = data.dataset_info(config)
  assert info.spatial_dims == 3 and info.image_shape == (8, 8, 8, 1) and info.spacing == (3.0, 1.0, 1.0)
  # the network follows the data: 3-D, and the 3 mm axis waits one level (nnU-Net's rule)
  full = ml_collections.ConfigDict({'preset': 'unet', 'model': {'depth': 2, 'base_width': 2}, 'data': config})
  model_config, _, resolved = loop.resolve(full)
  assert model_config.spatial_dims == 3 and model_config.pool_strides == ((1, 2, 2), (2, 2, 2))
  assert resolved['model']['spatial_dims'] == 3
  flat = tmp_path / 'flat'
  for sub in ('images', 'masks'):
    (flat / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / sub / 'a.png')
  with pytest.raises(DataError, match='is for volumes'):  # spacing given to images
    data.open_split(_config(flat, spacing=(1.0, 1.0, 1.0), holdout_percent=0), 'train')
  norm = data.resolve_normalization(config, spatial_dims=3)
  voxels = record['image'].astype(np.float64)
  whole = (voxels - voxels.mean()) / voxels.std()  # over every voxel of the volume, not slice by slice
  np.testing.assert_allclose(norm(record['image']), whole, atol=1e-4)


def test_volume_inputs_that_cannot_be_read_are_one_line_errors(tmp_path):
  root = _nifti_folder(tmp_path / 'ct', [(6, 12, 10)])
  four = tmp_path / 'four.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), four)
  with pytest.raises(DataError, match=r'4th, time or channel axis') as error:
    volumes.read(four, 'image')
  assert '\n' not in str(error.value)
  # a TIFF stack without a recorded spacing needs data.spacing; given it, it reads
  stack = tmp_path / 'stack'
  for split in ('train', 'validation', 'test'):
    for sub in ('images', 'masks'):
      (stack / split / sub).mkdir(parents=True)
    voxels = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    tifffile.imwrite(stack / split / 'images' / 'a.tif', voxels, photometric='minisblack', metadata={'axes': 'ZYX'})
    tifffile.imwrite(
      stack / split / 'masks' / 'a.tif',
      np.zeros((4, 8, 8), np.uint8),
      photometric='minisblack',
      metadata={'axes': 'ZYX'},
    )
  with pytest.raises(DataError, match=r'records no voxel spacing.*data\.spacing') as error:
    data.open_split(_config(stack), 'train')[0]  # noqa: B018
  assert '\n' not in str(error.value)
  np.testing.assert_array_equal(
    data.open_split(_config(stack, spacing=(3.0, 0.5, 0.5)), 'train')[0]['spacing'], [3, 0.5, 0.5]
  )
  with pytest.raises(DataError, match='set data.patch_size'):
    data.dataset_info(_config(root, patch_size=None))
  with pytest.raises(DataError, match="data.evaluation='whole'"):
    data.dataset_info(_config(root, evaluation='resize'))


def test_an_imagej_stack_keeps_its_spacing(tmp_path):
  path = tmp_path / 'stack.tif'
  voxels = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
  tifffile.imwrite(path, voxels, imagej=True, resolution=(1 / 0.25, 1 / 0.5), metadata={'spacing': 2.0, 'axes': 'ZYX'})
  assert volumes.is_volume(path) and volumes.shape_of(path, 'image') == (3, 4, 5)
  np.testing.assert_allclose(volumes.spacing_of(path, 'image'), (2.0, 0.5, 0.25))
  np.testing.assert_array_equal(volumes.read(path, 'image'), voxels)


def _volume_element(shape=(20, 24, 28)):
  grid = np.indices(shape)
  image = np.stack([grid[0], grid[1], grid[2]], -1).astype(np.uint16)  # each voxel names its place
  mask = np.zeros(shape, np.uint8)
  mask[15:17, 3:5, 20:22] = 1
  return {'image': image, 'mask': mask, 'id': 'v', 'spacing': np.ones(3, np.float32)}


def test_a_3d_patch_is_a_cube_cut_at_scale_one_and_a_forced_one_holds_foreground():
  element = _volume_element()
  sampler = transforms.RandomPatch(8, foreground=1.0)
  rng = np.random.default_rng(0)
  for _ in range(20):
    out = sampler.random_map(element, rng)
    assert out['image'].shape == (8, 8, 8, 3) and out['mask'].shape == out['weight'].shape == (8, 8, 8)
    assert out['mask'].any() and out['weight'].all()
    origin = out['image'][0, 0, 0]
    np.testing.assert_array_equal(out['image'][..., 0] - origin[0], np.indices((8, 8, 8))[0])  # no resizing
    window = tuple(slice(int(o), int(o) + 8) for o in origin)
    np.testing.assert_array_equal(out['mask'], element['mask'][window])
  small = transforms.RandomPatch(32, foreground=0.0).random_map(element, rng)  # padded, the padding weighted 0
  assert small['mask'].shape == (32, 32, 32) and small['weight'].sum() == np.prod(element['mask'].shape)


def test_3d_flips_and_turns_move_image_and_mask_together_and_reach_every_axis():
  element = _volume_element((8, 8, 8))
  element['mask'] = (element['image'][..., 0] * 64 + element['image'][..., 1] * 8 + element['image'][..., 2]).astype(
    np.uint16
  )
  flip = transforms.RandomFlipRotate()
  rng = np.random.default_rng(1)
  firsts = set()
  for _ in range(40):
    out = flip.random_map(element, rng)
    code = out['image'][..., 0] * 64 + out['image'][..., 1] * 8 + out['image'][..., 2]
    np.testing.assert_array_equal(code, out['mask'])  # the same voxel moved in both
    firsts.add(tuple(int(v) for v in out['image'][0, 0, 0]))
  assert {v[0] for v in firsts} == {0, 7}  # depth flipped in some draws and not in others
  assert len(firsts) == 8  # every corner reached


def test_a_3d_model_on_2d_images_is_a_one_line_error(data_config):
  full = ml_collections.ConfigDict({'preset': 'unet', 'model': {'depth': 2, 'spatial_dims': 3}, 'data': data_config})
  with pytest.raises(UserError, match=r'model.spatial_dims=3 but synthetic_roads/small holds 2-D images') as error:
    loop.resolve(full)
  assert '\n' not in str(error.value)
