"""Seconds-long smoke run for tests: tiny network, small dataset, a handful of steps.

python experiments/train.py --model=resunet --config=experiments/configs/quick.py --workdir=runs/quick
"""

import ml_collections

from resunet_jax import configs


def get_config() -> ml_collections.ConfigDict:
  """Returns the quick config."""
  config = configs.base_config()
  config.model.base_width = 4
  config.model.depth = 2
  config.data.name = 'synthetic_roads/small'
  config.data.image_size = 32
  config.data.read_threads = 2
  config.data.prefetch = 4
  config.train.batch_size = 4
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.eval_every = 3
  config.train.checkpoint_every = 3
  config.train.warmup_steps = 2
  config.train.num_sample_images = 2
  return config
