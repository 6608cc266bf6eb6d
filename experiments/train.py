r"""Trains a U-Net / ResUNet and evaluates it on the validation split.

  python experiments/train.py --model=resunet
  python experiments/train.py --model=unet --config=experiments/configs/quick.py --workdir=runs/try
  python experiments/train.py --model=resunet --config.model.residual=False   # a plain U-Net
  python experiments/train.py --model=unet --config.model.base_width=64 --summary  # blocks, parameters

`--model`, when given, picks the preset (else the config file's `preset`, by default 'resunet');
`--config.model.FIELD=VALUE` and every other `--config.a.b=v` win over the preset and the config
file. `--config.runtime.backend=stock|cpu|auto` picks the layer set (resunet_jax.runtime).
Restarting with the same `--workdir` resumes.
"""

from absl import flags

from resunet_jax import cli, models
from resunet_jax.training import loop

_MODEL = flags.DEFINE_string(
  'model', None, f"Model preset: {', '.join(models.PRESETS)}; default: the config file's preset (resunet)."
)
_CONFIG = cli.define_config_file('config', 'experiments/configs/default.py', 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder; default runs/<preset>-<data>-<config hash>.')
_SUMMARY = flags.DEFINE_bool('summary', False, 'Print the dataset and model summaries and exit without training.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --model=resunet')
  config = _CONFIG.value
  if _MODEL.value is not None:  # given: wins over the config file's preset
    config.preset = _MODEL.value
  if _SUMMARY.value:
    print(loop.summary(config))
    return
  result = loop.train_and_evaluate(config, _WORKDIR.value)
  print(loop.describe(result))


if __name__ == '__main__':
  cli.run(main)
