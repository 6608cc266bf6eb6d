"""The pre-registered skip/residual study (studies/skip_residual/PROTOCOL.md), CPU-sized.

  python studies/skip_residual/run.py

32x32 crops (`size32` datasets) of both synthetic datasets; stages tune, pilot, primary,
depth, secondary, boundary and, at the plateau budget, plateau_primary and plateau_depth
(`studies.skip_residual.protocol`). The tables go to studies/skip_residual/results/ after every
population; rerunning the command resumes, in a fresh clone too: the runs that results.csv lists
are read back from it, never trained again.
"""

import pathlib

import ml_collections

from resunet_jax import ablation
from studies.skip_residual import protocol


def get_config() -> ml_collections.ConfigDict:
  """Returns the study config."""
  config = ablation.grid.cpu_config()
  config.data.image_size = 32
  # The stock layers from the depth stage on (README.md of this folder says why); the backend is
  # not in a run's hash.
  config.runtime.backend = 'stock'
  config.ablation.protocol = protocol.section()
  config.ablation.protocol.boundary = ('synthetic_cells/size32', 'synthetic_cells/three_class_size32')
  config.ablation.protocol.plateau_stages = True  # PROTOCOL.md, amendment 8
  config.ablation.protocol.output = str(pathlib.Path(__file__).resolve().parents[1] / 'results')
  return config
