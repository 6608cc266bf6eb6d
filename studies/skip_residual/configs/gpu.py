"""The pre-registered study (studies/skip_residual/PROTOCOL.md) as a GPU runs it: the whole factorial, 10 seeds.

  python studies/skip_residual/run.py --config=studies/skip_residual/configs/gpu.py --workdir=runs/skip_residual_gpu

The CPU study's stages and settings (`study.py`) at 64x64 (the `size64` datasets, as
the earlier grid), with every tier at 10 seeds, the secondary stage as the whole factorial
(every block x recipe x skips arm at its recipe's best rate: `protocol.section().factorial`)
and no compute cuts. Populations vmap their members on an accelerator (`runtime.members`
'auto'). Tables to studies/skip_residual/results_gpu64/, resumable like the CPU study's. The 128x128
study is the same with `data.image_size = 128` and the full-size datasets
('synthetic_roads', 'synthetic_cells') in `config.ablation.protocol.datasets`.
"""

import pathlib

import ml_collections

from resunet_jax import ablation
from studies.skip_residual import protocol


def get_config() -> ml_collections.ConfigDict:
  """Returns the GPU study config."""
  config = ablation.grid.cpu_config()
  config.data.image_size = 64
  settings = config.ablation.protocol = protocol.factorial_section(
    ('synthetic_roads/size64', 'synthetic_cells/size64'),
    ('synthetic_cells/size64', 'synthetic_cells/three_class_size64'),
  )
  settings.output = str(pathlib.Path(__file__).resolve().parents[1] / 'results_gpu64')
  return config
