"""Volume files: NIfTI (nibabel) and TIFF stacks (tifffile), with their voxel spacing.

A volume is `[D, H, W, C]` in the file's own axis order (NIfTI: nibabel's i, j, k; a TIFF stack:
its pages, rows, columns), its spacing `(d, h, w)` in the file's units per voxel (NIfTI: the
header's zooms, usually mm; TIFF: ImageJ's `spacing` and the resolution tags), None where the
file records none. Nothing is resampled or reoriented: a prediction written back with the
input's affine (`write_nifti`) lies on the input voxel for voxel.
"""

from __future__ import annotations

import pathlib

import nibabel as nib
import numpy as np
import tifffile

from resunet_jax.errors import DataError

NIFTI_SUFFIXES = ('.nii', '.nii.gz')
TIFF_SUFFIXES = ('.tif', '.tiff')


def split_suffix(path: pathlib.Path) -> tuple[str, str]:
  """`(stem, suffix)` with NIfTI's double suffix kept whole: 'ct_01.nii.gz' -> ('ct_01', '.nii.gz')."""
  name = path.name
  if name.lower().endswith('.nii.gz'):
    return name[: -len('.nii.gz')], '.nii.gz'
  return path.stem, path.suffix.lower()


def is_nifti(path: pathlib.Path) -> bool:
  return split_suffix(path)[1] in NIFTI_SUFFIXES


def is_tiff_stack(path: pathlib.Path) -> bool:
  """A TIFF whose first series has a Z axis of more than one page (ImageJ and OME stacks)."""
  if split_suffix(path)[1] not in TIFF_SUFFIXES:
    return False
  try:
    with tifffile.TiffFile(path) as tiff:
      series = tiff.series[0]
      return any(axis == 'Z' and size > 1 for axis, size in zip(series.axes, series.shape, strict=True))
  except (OSError, ValueError, IndexError, tifffile.TiffFileError) as e:
    raise DataError(f'cannot read {path}: {e}; replace or remove the file') from None


def is_volume(path: pathlib.Path) -> bool:
  """A NIfTI file or a TIFF stack."""
  return is_nifti(path) or is_tiff_stack(path)


def _nifti(path: pathlib.Path, kind: str) -> nib.Nifti1Image:
  try:
    image = nib.load(path)
  except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as e:
    raise DataError(f'cannot read {kind} {path}: {e}; replace or remove the file') from None
  shape = image.shape
  if len(shape) < 3 or len(shape) > 4 or (len(shape) == 4 and shape[3] != 1):
    raise DataError(
      f'{kind} {path} has shape {shape}; a NIfTI volume has 3 axes (a 4th, time or channel axis, is not '
      'read: save each 3-D volume as its own file)'
    )
  return image


def _tiff_spacing(tiff: tifffile.TiffFile) -> tuple[float, float, float] | None:
  """ImageJ's slice `spacing` and the resolution tags (pixels per unit), or None without them."""
  page = tiff.pages[0]
  metadata = tiff.imagej_metadata or {}
  tags = {name: page.tags.get(name) for name in ('XResolution', 'YResolution')}
  if 'spacing' not in metadata or any(tag is None for tag in tags.values()):
    return None
  (xn, xd), (yn, yd) = tags['XResolution'].value, tags['YResolution'].value
  if not (xn and yn):
    return None
  return float(metadata['spacing']), yd / yn, xd / xn


def shape_of(path: pathlib.Path, kind: str) -> tuple[int, int, int]:
  """`(D, H, W)` of a volume file from its header."""
  if is_nifti(path):
    return tuple(int(n) for n in _nifti(path, kind).shape[:3])
  with tifffile.TiffFile(path) as tiff:
    series = tiff.series[0]
    sizes = dict(zip(series.axes, series.shape, strict=True))
  return sizes.get('Z', 1), sizes['Y'], sizes['X']


def spacing_of(path: pathlib.Path, kind: str) -> tuple[float, float, float] | None:
  """The voxel spacing a volume file records (header only), None where it records none."""
  if is_nifti(path):
    zooms = _nifti(path, kind).header.get_zooms()[:3]
    return tuple(float(z) for z in zooms) if all(z > 0 for z in zooms) else None
  with tifffile.TiffFile(path) as tiff:
    return _tiff_spacing(tiff)


def affine_of(path: pathlib.Path) -> np.ndarray | None:
  """A NIfTI file's voxel-to-world affine `[4, 4]`; None for other files."""
  return np.asarray(_nifti(path, 'image').affine) if is_nifti(path) else None


def read(path: pathlib.Path, kind: str) -> np.ndarray:
  """A volume file's voxels as stored: `[D, H, W]`, or `[D, H, W, C]` for a TIFF stack with channels."""
  if is_nifti(path):
    image = _nifti(path, kind)
    try:
      voxels = np.asanyarray(image.dataobj)
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f'cannot read {kind} {path}: {e}; replace or remove the file') from None
    return voxels.reshape(voxels.shape[:3])
  try:
    with tifffile.TiffFile(path) as tiff:
      series = tiff.series[0]
      axes, voxels = series.axes, series.asarray()
  except (OSError, ValueError, IndexError, tifffile.TiffFileError) as e:
    raise DataError(f'cannot read {kind} {path}: {e}; replace or remove the file') from None
  kept = [i for i, (axis, size) in enumerate(zip(axes, voxels.shape, strict=True)) if size > 1 or axis in 'ZYX']
  names = ''.join(axes[i] for i in kept)
  extra = [i for i in kept if axes[i] not in 'ZYX']
  if len(extra) > 1 or any(axes[i] not in 'SC' for i in extra):
    raise DataError(f'{kind} {path} holds a {axes} array of shape {voxels.shape}; a stack is ZYX, with channels')
  voxels = voxels.reshape([voxels.shape[i] for i in kept])
  order = [names.index(a) for a in 'ZYX'] + [names.index(axes[i]) for i in extra]
  return voxels.transpose(order)


def write_nifti(path: pathlib.Path, array: np.ndarray, affine: np.ndarray | None, spacing=None) -> None:
  """`array` `[D, H, W]` (or with trailing axes) as NIfTI, on `affine` (else a diagonal of `spacing`)."""
  if affine is None:
    affine = np.diag([*(spacing if spacing is not None else (1.0, 1.0, 1.0)), 1.0])
  nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
