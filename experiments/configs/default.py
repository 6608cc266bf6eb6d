"""Default experiment: `python experiments/train.py --model=resunet` on a 2-core CPU.

Trains on the embedded `synthetic_roads` (128x128) in a few minutes. Reduced from the note's
network for the CPU: `base_width` 16 instead of 64 (16x fewer FLOPs);
`--config.model.base_width=64` gives the note's full width, `experiments/configs/tpu_pod.py`
the full-size run. Every other default is in `resunet_jax.configs.base_config()`.
"""

import ml_collections

from resunet_jax import configs


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config."""
  config = configs.base_config()
  config.model.base_width = 16
  config.train.batch_size = 8
  config.train.num_steps = 400
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.train.warmup_steps = 20
  config.train.learning_rate = 2e-3
  return config
