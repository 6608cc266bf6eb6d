"""Default experiment config.

  python experiments/train.py --model=resunet
  python experiments/train.py --model=unet --config.model.skips=none --config.model.norm=batch

`--model` picks a preset of `resunet_jax.models.PRESETS`; every `config.model` field left
None takes the preset's value, and one set here or by `--config.model.FIELD=VALUE` wins over
it. The model fields are exactly those of `resunet_jax.models.ModelConfig`.
"""

import ml_collections

from resunet_jax import cli


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = cli.model_config_dict()
  config.data = ml_collections.ConfigDict()
  # Square input side; the embedded datasets are 128x128 RGB.
  config.data.image_size = 128
  config.data.channels = 3
  return config
