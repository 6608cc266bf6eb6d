"""The study's stages in miniature, for tests: tiny network, 2 recipes x 2 rates, budgets of 3-6 steps.

python studies/skip_residual/run.py --config=studies/skip_residual/configs/quick.py --workdir=runs/study-quick
"""

import pathlib
import runpy

import ml_collections

from resunet_jax import ablation
from studies.skip_residual import protocol

_quick = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[3] / 'experiments/configs/quick.py'))['get_config']


def get_config() -> ml_collections.ConfigDict:
  """Returns the quick study config."""
  config = _quick()
  config.preset = 'unet'
  config.train.num_sample_images = 1
  config.train.eval_every = 2
  config.ablation = ablation.section()
  settings = config.ablation.protocol = protocol.section()
  settings.datasets = ('synthetic_roads/small',)
  settings.recipes = ('lecun-none', 'he-group')
  settings.learning_rates = (1e-3, 1e-2)
  settings.budgets = (3, 4, 6)
  settings.pilot_seeds = 2
  settings.primary_seeds = 2
  settings.secondary_seeds = 1
  settings.depth = 2
  settings.other_depths = (3,)
  settings.depth_param_tolerance = 0.5
  settings.budget_minutes = 1e6
  settings.boundary = ('synthetic_roads/small', 'synthetic_cells/three_class_small')  # roads' choices: the only dataset
  return config
