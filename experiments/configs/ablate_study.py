"""The pre-registered skip/residual study (docs/ablation/PROTOCOL.md), CPU-sized.

  python experiments/ablate.py --config=experiments/configs/ablate_study.py --workdir=runs/ablate_study

32x32 crops (`size32` datasets) of both synthetic datasets; stages tune, pilot, primary,
secondary and depth (`resunet_jax.ablation.protocol`). Rerunning the command resumes: finished
runs are read back and the report is rewritten.
"""

import ml_collections

from resunet_jax import ablation


def get_config() -> ml_collections.ConfigDict:
  """Returns the study config."""
  config = ablation.grid.cpu_config()
  config.data.image_size = 32
  config.ablation.protocol = ablation.protocol.section()
  return config
