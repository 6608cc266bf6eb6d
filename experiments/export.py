r"""Exports a trained run as a deployable artefact (resunet_jax/export.py): StableHLO or ONNX.

  python experiments/export.py --workdir=W --format=stablehlo --output=DIR [--checkpoint=best] [--member=M]
  python experiments/export.py --workdir=W --format=onnx --output=DIR [--tile=128]

DIR gets the model file (model.stablehlo | model.onnx), its model card model.json and, for
StableHLO, load.py (runs it with jax and numpy only). StableHLO takes any batch, height and
width; ONNX any batch at a fixed tile (`--tile`, default the training size: data.patch_size, else
data.image_size). Both take
float32 [N, H, W, 3] pixel values in 0..255 and return (logits, probabilities).
`python experiments/predict.py --exported=DIR --input=...` predicts with an artefact.
"""

from absl import flags

from resunet_jax import cli, export

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a training run.', required=True)
_FORMAT = flags.DEFINE_string('format', 'stablehlo', f'One of {", ".join(export.FORMATS)}.')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the artefact.', required=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', "'best' (validation Dice), 'latest' or a step.")
_MEMBER = flags.DEFINE_integer('member', 0, 'Population member (0 for an ordinary run).')
_TILE = flags.DEFINE_integer(
  'tile', None, 'ONNX: the fixed side of each axis; default the training size (data.patch_size, else data.image_size).'
)
_PRUNE = flags.DEFINE_integer(
  'prune_level', None, 'A deeply supervised UNet++: export its sub-network of this depth (models.prune).'
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --format=onnx')
  path = export.export_run(
    _WORKDIR.value,
    _OUTPUT.value,
    fmt=_FORMAT.value,
    checkpoint=_CHECKPOINT.value,
    member=_MEMBER.value,
    tile=_TILE.value,
    prune_level=_PRUNE.value,
    command=export.command_line(),
  )
  print(f'wrote {path} and its model card {path.parent / export.CARD}')


if __name__ == '__main__':
  cli.run(main)
