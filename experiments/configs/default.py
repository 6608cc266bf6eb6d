"""Default experiment config.

  python experiments/train.py --model=resunet
  python experiments/train.py --model=unet --config.model.skips=none --config.model.norm=batch
  python experiments/train.py --config.data.name=synthetic_cells/three_class_default

`--model` picks a preset of `resunet_jax.models.PRESETS`; every `config.model` field left
None takes the preset's value, and one set here or by `--config.model.FIELD=VALUE` wins over
it. The model fields are exactly those of `resunet_jax.models.ModelConfig`; `num_classes`
left None follows the dataset (1 logit for a binary task, K for K classes). The data fields
and their defaults are those of `resunet_jax.data.default_config()`.
"""

import ml_collections

from resunet_jax import cli, data


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = cli.model_config_dict()
  config.data = data.default_config()
  return config
