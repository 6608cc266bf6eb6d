"""The skip/residual study (PROTOCOL.md) at the note's full size on a TPU pod (or a GPU cluster).

  # every worker runs the same command, as in experiments/launch/tpu_pod.sh, with a --workdir
  # on storage every worker sees (e.g. a gcsfuse mount of a bucket):
  python studies/skip_residual/run.py --config=studies/skip_residual/configs/tpu_pod.py \
    --workdir=/mnt/shared/skip_residual

The stages and tests of the CPU study (`study.py`) on the full 128x128 datasets with the
note's network: depth 4, base width 64 (so the equal-parameter `plain-wide` control has a
width of its own), bfloat16 compute with float32 parameters and logits, global batch 256. Every
block x recipe x skips arm (`factorial`), 10 seeds for every tier, no compute cuts; claim 3's
boundary class on the three-class cells data. The tables go to the workdir (`output` = '').
"""

import ml_collections

from resunet_jax import ablation, configs
from studies.skip_residual import protocol


def get_config() -> ml_collections.ConfigDict:
  """Returns the full-size study config."""
  config = configs.base_config()
  config.preset = 'unet'  # the block is switched per arm
  config.model.depth = 4
  config.model.base_width = 64
  config.model.dtype = 'bfloat16'
  config.data.read_threads = 16
  config.data.num_workers = 8
  config.train.batch_size = 256
  config.train.eval_every = 50  # claim 1's validation-Dice curve, as in the CPU study
  config.train.log_every = 50
  config.train.warmup_steps = 20
  config.parallel.distributed = 'auto'
  config.ablation = ablation.section()
  config.ablation.protocol = protocol.factorial_section(
    ('synthetic_roads', 'synthetic_cells'), ('synthetic_cells', 'synthetic_cells/three_class_default')
  )
  return config
