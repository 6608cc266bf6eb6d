"""The pre-registered skip/residual study (docs/ablation/PROTOCOL.md), CPU-sized.

  python experiments/ablate.py --config=experiments/configs/ablate_study.py --workdir=runs/ablate_study

32x32 crops (`size32` datasets) of both synthetic datasets; stages tune, pilot, primary,
depth, secondary, boundary and, at the plateau budget, plateau_primary and plateau_depth
(`resunet_jax.ablation.protocol`). The tables go to docs/ablation/study/ after every population;
rerunning the command resumes, in a fresh clone too: the runs that docs/ablation/study/results.csv
lists are read back from it, never trained again.
"""

import pathlib

import ml_collections

from resunet_jax import ablation


def get_config() -> ml_collections.ConfigDict:
  """Returns the study config."""
  config = ablation.grid.cpu_config()
  config.data.image_size = 32
  # The stock layers since the depth stage (2026-12-02): the CPU backend's layers gave a non-finite
  # loss at the first step for GroupNorm networks of odd width (depth 2, base width 33; stock trains
  # them), a max-pool gradient bug fixed on 2026-12-03; the study stays on the stock layers it ran
  # on since. At width 8 both agree to rounding. The backend is not in a run's hash.
  config.runtime.backend = 'stock'
  config.ablation.protocol = ablation.protocol.section()
  config.ablation.protocol.boundary = ('synthetic_cells/size32', 'synthetic_cells/three_class_size32')
  config.ablation.protocol.plateau_stages = True  # amendment 8: cut 4 capped B at 1000, the plateau is 3000
  config.ablation.protocol.output = str(pathlib.Path(__file__).resolve().parents[2] / 'docs/ablation/study')
  return config
