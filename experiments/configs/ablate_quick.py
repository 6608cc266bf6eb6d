"""A tiny ablation grid for tests: 2 arms (plain, residual) x 2 seeds x 6 steps, in about a minute.

python experiments/ablate.py --config=experiments/configs/ablate_quick.py --workdir=runs/ablate-quick
"""

import ml_collections

from resunet_jax import ablation, configs


def get_config() -> ml_collections.ConfigDict:
  """Returns the quick ablation config."""
  config = configs.base_config()
  config.preset = 'unet'
  config.model.base_width = 4
  config.model.depth = 2
  config.data.image_size = 32
  config.data.read_threads = 2
  config.data.prefetch = 4
  config.train.batch_size = 4
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.eval_every = 3
  config.train.checkpoint_every = 3
  config.train.warmup_steps = 2
  config.train.num_sample_images = 1
  config.ablation = ablation.section()
  config.ablation.seeds = 2
  config.ablation.target_dice = 0.05
  config.ablation.studies.roads = ablation.study('synthetic_roads/small')
  return config
