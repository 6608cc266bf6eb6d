"""A tiny ablation grid for tests: 2 arms (plain, residual) x 2 seeds x 6 steps, in about a minute,
and the skip paths: a residual network with attention-gated and with nested (UNet++) skips, both
deeply supervised, so that every skip kind and deep supervision go through the grid.

python experiments/ablate.py --config=experiments/configs/ablate_quick.py --workdir=runs/ablate-quick

The training settings are those of `quick.py` (tiny network, 32x32, 6 steps).
"""

import pathlib
import runpy

import ml_collections

from resunet_jax import ablation

_quick = runpy.run_path(str(pathlib.Path(__file__).with_name('quick.py')))['get_config']


def get_config() -> ml_collections.ConfigDict:
  """Returns the quick ablation config."""
  config = _quick()
  config.preset = 'unet'
  config.train.num_sample_images = 1
  config.ablation = ablation.section()
  config.ablation.seeds = 2
  config.ablation.target_dice = 0.05
  config.ablation.studies.roads = ablation.study('synthetic_roads/small')
  config.ablation.studies.skip_paths = ablation.study(
    'synthetic_roads/small', residual=(True,), skip_kinds=('attention', 'nested'), deep_supervision=(True,)
  )
  return config
