r"""Trains a U-Net / ResUNet.

  python experiments/train.py --model=resunet [--config=experiments/configs/default.py] \
    [--config.model.FIELD=VALUE ...]

The training loop is not in the package yet: for now this resolves the model from the preset
and config overrides and prints its summary (blocks, parameter counts, logits shape).
"""

from absl import flags

from resunet_jax import cli, models
from resunet_jax.models import summary

_MODEL = flags.DEFINE_string('model', 'resunet', f'Model preset: {", ".join(models.PRESETS)}.')
_CONFIG = cli.define_config_file('config', 'experiments/configs/default.py', 'Experiment config file.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --model=resunet')
  config = _CONFIG.value
  model_config = cli.resolve_model(_MODEL.value, config.model)
  size = config.data.image_size
  print(f'model: {_MODEL.value}')
  print(f'config: {model_config}')
  print(summary.summarize(model_config, (1, size, size, config.data.channels)))


if __name__ == '__main__':
  cli.run(main)
