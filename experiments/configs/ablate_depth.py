"""Depth sweep for the note's claim 4 (residual connections allow deeper networks).

  python experiments/ablate.py --config=experiments/configs/ablate_depth.py

{plain, residual} x depth 2..6 with all skips x 3 seeds on `synthetic_roads/size64` (30 runs,
about 45 minutes on a 2-core CPU), with the default grid's settings
(`resunet_jax.ablation.grid.cpu_config`). At 64x64, depth 6 reaches a 1x1 bottleneck.
"""

import ml_collections

from resunet_jax import ablation


def get_config() -> ml_collections.ConfigDict:
  """Returns the depth-sweep config."""
  config = ablation.grid.cpu_config()
  config.ablation.studies.depth = ablation.study('synthetic_roads/size64', depths=(2, 3, 4, 5, 6))
  return config
