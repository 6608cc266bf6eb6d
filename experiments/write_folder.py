r"""Writes an embedded (or any 8-bit RGB) dataset as an image folder of another bit depth and channel count.

  python experiments/write_folder.py --output=DIR [--dataset=synthetic_roads/small] [--depth=16] \
    [--channels=1] [--limit=N]

Writes DIR/{train,validation,test}/{images,masks} (resunet_jax/data/folders.py says how pixels
are converted: 12-bit is x16, 16-bit x257, float x/127.5-1), which
`--config.data.name=folder --config.data.folder=DIR` trains on.
"""

from absl import flags

from resunet_jax import cli, data
from resunet_jax.data import folders

_OUTPUT = flags.DEFINE_string('output', None, 'Folder to write.', required=True)
_DATASET = flags.DEFINE_string('dataset', 'synthetic_roads/small', 'An 8-bit RGB TFDS dataset (embedded ones build).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory; default $TFDS_DATA_DIR or the TFDS default.')
_DEPTH = flags.DEFINE_enum('depth', '16', folders.DEPTHS, 'Bit depth: 8, 12, 16 or float.')
_CHANNELS = flags.DEFINE_integer('channels', 3, 'Image channels, taken from R, G, B, grey in turn.')
_LIMIT = flags.DEFINE_integer('limit', None, 'At most this many images per split.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --depth=16')
  config = data.default_config()
  config.name, config.data_dir = _DATASET.value, _DATA_DIR.value
  root = folders.write_folder(config, _OUTPUT.value, depth=_DEPTH.value, channels=_CHANNELS.value, limit=_LIMIT.value)
  print(f'wrote {_DATASET.value} as {_DEPTH.value}-bit, {_CHANNELS.value}-channel images to {root}')


if __name__ == '__main__':
  cli.run(main)
