r"""Predicts masks for images of any size with a trained run (sliding-window inference).

  python experiments/predict.py --workdir=W --input=PATH_OR_FOLDER --output=DIR \
    [--checkpoint=best] [--member=M] [--tile=128] [--overlap=0.5] [--tta] [--probabilities]
  python experiments/predict.py --workdir=W --input=split:test[:4] --output=DIR
  python experiments/predict.py --exported=DIR --input=PATH_OR_FOLDER --output=OUT [--tile] [--tta]

For every image writes DIR/<stem>_mask.png (class ids; 0/255 for a binary model),
DIR/<stem>_overlay.png (percentile-stretched where the image is not 8-bit) and, with
--probabilities, DIR/<stem>_probabilities.npy ([H, W, C] float32). A 3-D model reads volumes (NIfTI,
TIFF stacks) and writes DIR/<stem>_mask.nii.gz (class ids) on the input's affine (a TIFF stack or a
split's volume: a diagonal of its voxel spacing), with the overlay of its middle slice. Images are
read as training reads them (8- and 16-bit, float, any channel count) and normalised with the run's
own rule and statistics; an 8-bit grey or RGBA image given to an RGB model is converted, with a
note, and any other channel mismatch is an error. `--input=split:SPLIT` reads a split of the run's
own dataset. `--exported=DIR` predicts with an artefact of experiments/export.py instead of a
checkpoint, through the same sliding window (an ONNX artefact's fixed size is the tile), so it
writes the same masks.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from resunet_jax import cli, data, export, inference, runtime
from resunet_jax.data import volumes
from resunet_jax.training import reporting, restore

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a training run (or --exported).')
_EXPORTED = flags.DEFINE_string('exported', None, 'An artefact folder of experiments/export.py (or --workdir).')
_INPUT = flags.DEFINE_string('input', None, 'An image, a folder of images, or split:SPLIT.', required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the predictions.', required=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', "'best' (validation Dice), 'latest' or a step.")
_MEMBER = flags.DEFINE_integer('member', 0, 'Population member (0 for an ordinary run).')
_PRUNE = flags.DEFINE_integer(
  'prune_level', None, 'A deeply supervised UNet++: predict with its sub-network of this depth (models.prune).'
)
_BACKEND = flags.DEFINE_enum(
  'backend', 'auto', runtime.BACKENDS, 'Layer set (resunet_jax.runtime): auto, stock or cpu.'
)
_TILE = flags.DEFINE_integer(
  'tile', None, 'Tile side; default the training size (data.patch_size, else data.image_size).'
)
_OVERLAP = flags.DEFINE_float('overlap', 0.5, 'Fraction of a tile shared with its neighbours.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Tiles per model call.')
_BLEND = flags.DEFINE_enum('blend', 'gaussian', list(inference.BLENDS), 'Tile blending weights.')
_TTA = flags.DEFINE_bool('tta', False, 'Average over horizontal and vertical flips.')
_PROBABILITIES = flags.DEFINE_bool('probabilities', False, 'Also save probabilities as .npy.')


def _images(spec: str, config, spatial_dims: int):
  """Yields (stem, pixels [H, W, C] or a volume's [D, H, W(, C)], affine or None, spacing or None)
  for a file, a folder, or split:SPLIT of the run's dataset."""
  if spec.startswith('split:'):
    source = data.open_split(config.data, spec.removeprefix('split:'))
    for index in range(len(source)):
      record = source[index]
      yield record['id'], record['image'], None, record.get('spacing')
    return
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if volumes.split_suffix(p)[1] in data.sources.IMAGE_SUFFIXES)
    if not files:
      raise cli.UserError(f'{path} holds no images ({", ".join(data.sources.IMAGE_SUFFIXES)})')
  elif path.is_file():
    files = [path]
  else:
    raise cli.UserError(f'--input={spec} is neither an image, a folder nor split:SPLIT')
  for file in files:
    stem = volumes.split_suffix(file)[0]
    if volumes.is_volume(file) != (spatial_dims == 3):
      kind = ('a volume', 'a 2-D model') if spatial_dims == 2 else ('a 2-D image', 'a 3-D model: it takes volumes')
      raise cli.UserError(f'{file} is {kind[0]} and this is {kind[1]}; predict it with a model of its dimensions')
    if spatial_dims == 3:
      yield stem, volumes.read(file, 'image'), volumes.affine_of(file), volumes.spacing_of(file, 'image')
    else:
      yield stem, data.sources.read_image(file), None, None


def _model():
  """(apply_fn, variables, normalization, tile, run config or None, a description) of --workdir or
  --exported; apply_fn takes pixel values and normalises them (as an exported model does inside)."""
  if (_WORKDIR.value is None) == (_EXPORTED.value is None):
    raise cli.UserError('pass either --workdir (a training run) or --exported (an artefact of experiments/export.py)')
  if _WORKDIR.value is not None:
    run = restore.load_run(_WORKDIR.value, _CHECKPOINT.value, _BACKEND.value, _MEMBER.value, _PRUNE.value)
    norm = data.normalization.of_config(run.config.data, run.config.data.channels, run.model.config.spatial_dims)
    tile = _TILE.value or run.config.data.get('patch_size') or run.config.data.image_size

    def apply(variables, tiles):
      return run.apply(variables, norm(tiles, jnp))

    return apply, run.variables, norm, tile, run.config, f'checkpoint step {run.step}'
  if _PRUNE.value is not None:
    raise cli.UserError(
      '--prune_level prunes a --workdir run; export the pruned network with experiments/export.py --prune_level'
    )
  artefact = export.load(_EXPORTED.value)
  if artefact.tile is not None and _TILE.value not in (None, artefact.tile):
    raise cli.UserError(f'--tile={_TILE.value}: the {artefact.card["format"]} artefact takes {artefact.tile} only')
  tile = artefact.tile or _TILE.value or int(artefact.card['tile'])

  def apply(variables, tiles):
    del variables
    return artefact.logits(tiles)

  return apply, {}, artefact.normalization, tile, None, f'{artefact.card["format"]} artefact {artefact.directory}'


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --input=PATH')
  apply, variables, norm, tile, config, source = _model()
  if config is None and _INPUT.value.startswith('split:'):
    raise cli.UserError("--input=split:SPLIT reads the run's dataset: use --workdir, or pass image files")
  output = pathlib.Path(_OUTPUT.value)
  try:
    output.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise cli.UserError(f'cannot create --output={output}: {e.strerror}') from None
  count = 0
  fixed, per_image, dims = norm.kind == 'fixed', norm.kind == 'per_image', norm.spatial_dims
  for stem, pixels, affine, spacing in tqdm(list(_images(_INPUT.value, config, dims)), unit='image'):
    image, note = data.sources.fit_channels(
      pixels, norm.channels, stem, eight_bit=fixed, varying=per_image, spatial_dims=dims
    )
    if note:
      tqdm.write(f'note: {note}')
    logits = inference.sliding_window(
      apply,
      variables,
      image.astype(np.float32),
      pad_value=norm.neutral(image),
      tile=tile,
      overlap=_OVERLAP.value,
      batch_size=_BATCH.value,
      blend=_BLEND.value,
      flip_tta=_TTA.value,
      progress=np.prod(image.shape[:-1]) > 16 * tile**dims,
    )
    mask = inference.classes(logits)
    if dims == 3:  # the class ids on the input's grid, and the middle slice's overlay
      volumes.write_nifti(output / f'{stem}_mask.nii.gz', mask, affine, spacing)
      image, mask = image[image.shape[0] // 2], mask[mask.shape[0] // 2]
    else:
      Image.fromarray(mask * 255 if logits.shape[-1] == 1 else mask).save(output / f'{stem}_mask.png')
    Image.fromarray(reporting.overlay(reporting.viewable(image), mask)).save(output / f'{stem}_overlay.png')
    if _PROBABILITIES.value:
      np.save(output / f'{stem}_probabilities.npy', inference.probabilities(logits))
    count += 1
  print(f'wrote masks and overlays of {count} images to {output} ({source})')


if __name__ == '__main__':
  cli.run(main)
