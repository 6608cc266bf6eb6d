r"""Trains a U-Net / ResUNet.

  python experiments/train.py --model=resunet [--config=experiments/configs/default.py] \
    [--config.model.FIELD=VALUE ...]

The training loop is not in the package yet: for now this prepares the dataset (the embedded
ones are built into the TFDS data directory on first use), resolves the model from the preset,
the config overrides and the dataset's class count, and prints both summaries.
"""

from absl import flags

from resunet_jax import cli, data, models
from resunet_jax.models import summary

_MODEL = flags.DEFINE_string('model', 'resunet', f'Model preset: {", ".join(models.PRESETS)}.')
_CONFIG = cli.define_config_file('config', 'experiments/configs/default.py', 'Experiment config file.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --model=resunet')
  config = _CONFIG.value
  model_config = cli.resolve_model(_MODEL.value, config.model)  # Config mistakes fail before any data work.
  info = data.dataset_info(config.data)
  if config.model.num_classes is None:
    model_config = model_config.replace(num_classes=info.model_outputs)
  print(f'data: {info.name}, {info.num_classes} classes, images {info.image_shape}, splits {dict(info.split_sizes)}')
  print(f'model: {_MODEL.value} {model_config}')
  print(summary.summarize(model_config, (1, *info.image_shape)))


if __name__ == '__main__':
  cli.run(main)
