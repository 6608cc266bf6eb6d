"""The default ablation grid, CPU-sized (about 40 minutes on a 2-core CPU).

  python experiments/ablate.py

`synthetic_roads`: {plain, residual} x {all skips, no skips, each single skip removed} x 3
seeds (36 runs); `synthetic_cells`: {plain, residual} x {all skips, no skips} x 3 seeds (12
runs). Settings of `resunet_jax.ablation.grid.cpu_config`: 64x64 inputs, depth 4, base width 8
instead of the note's 64, 300 steps of batch 16 for every arm.
"""

import ml_collections

from resunet_jax import ablation


def get_config() -> ml_collections.ConfigDict:
  """Returns the default ablation config."""
  config = ablation.grid.cpu_config()
  config.ablation.studies.roads = ablation.study('synthetic_roads/size64', skips=('all', 'none', 'drop_each'))
  config.ablation.studies.cells = ablation.study('synthetic_cells/size64', skips=('all', 'none'))
  return config
