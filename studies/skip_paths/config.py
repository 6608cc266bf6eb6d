"""The skip-path study of PROTOCOL.md beside this file, CPU-sized (about 30 minutes on 2 cores).

  python studies/skip_paths/run.py

{concat, attention, nested} skips x {plain, residual} blocks x 5 seeds (30 runs) on the
skip/residual study's roads setting: 32x32 crops, depth 4, base width 8, He initialisation and
GroupNorm, peak learning rate 0.01, 300 steps of batch 16. The report, CSVs and figures go to
results/ beside this file; the report's first section holds the protocol's seven verdicts.
"""

import pathlib

import ml_collections

from resunet_jax import ablation


def get_config() -> ml_collections.ConfigDict:
  """Returns the skip-path study config."""
  config = ablation.grid.cpu_config()
  config.data.image_size = 32
  config.model.init = 'he'
  config.model.norm = 'group'
  config.train.learning_rate = 0.01
  config.ablation.seeds = 5
  config.ablation.output = str(pathlib.Path(__file__).resolve().parent / 'results')
  config.ablation.studies.roads = ablation.study(
    'synthetic_roads/size32', skip_kinds=('concat', 'attention', 'nested'), deep_supervision=(False,)
  )
  return config
