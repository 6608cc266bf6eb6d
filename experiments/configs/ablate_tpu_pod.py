"""The ablation grids at the note's full width on a TPU pod (or a multi-GPU cluster).

  # every worker runs the same command, as in experiments/launch/tpu_pod.sh, with a --workdir
  # on storage every worker sees (e.g. a gcsfuse mount of a bucket):
  python experiments/ablate.py --config=experiments/configs/ablate_tpu_pod.py --workdir=/mnt/shared/ablate

Base width 64 and depth 4 (the note's network), bfloat16 compute with float32 parameters and
logits, global batch 256, the 128x128 datasets, 5,000 steps per run, 5 seeds. No
normalisation, as in the note, so that the arms differ only in their shortcuts. Studies:
roads {plain, residual} x {all, none, each single skip removed}; cells {plain, residual} x
{all, none}; and the depth sweep 2..6 on roads.
"""

import ml_collections

from resunet_jax import ablation, configs


def get_config() -> ml_collections.ConfigDict:
  """Returns the full-size ablation config."""
  config = configs.base_config()
  config.preset = 'unet'
  config.model.dtype = 'bfloat16'
  config.data.read_threads = 16
  config.data.num_workers = 8
  config.train.batch_size = 256
  config.train.num_steps = 5000
  config.train.eval_every = 250
  config.train.checkpoint_every = 500
  config.train.log_every = 50
  config.train.warmup_steps = 250
  config.parallel.distributed = 'auto'
  config.ablation = ablation.section()
  config.ablation.seeds = 5
  config.ablation.studies.roads = ablation.study('synthetic_roads', skips=('all', 'none', 'drop_each'))
  config.ablation.studies.cells = ablation.study('synthetic_cells', skips=('all', 'none'))
  config.ablation.studies.depth = ablation.study('synthetic_roads', depths=(2, 3, 4, 5, 6))
  return config
