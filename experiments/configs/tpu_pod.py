"""The note's full network at full size on a TPU pod (or a multi-GPU cluster).

  # every worker of the pod runs the same command (see experiments/launch/tpu_pod.sh):
  python experiments/train.py --model=resunet --config=experiments/configs/tpu_pod.py \\
    --workdir=gs://BUCKET/runs/resunet-roads

Base width 64 and depth 4 (the preset's), bfloat16 compute with float32 parameters and logits,
BatchNorm, a global batch of 256 split over all devices, 20k steps, `jax.distributed` started
from the pod's environment.
"""

import ml_collections

from resunet_jax import configs


def get_config() -> ml_collections.ConfigDict:
  """Returns the TPU pod config."""
  config = configs.base_config()
  config.model.dtype = 'bfloat16'
  config.model.norm = 'batch'
  config.data.num_workers = 8
  config.data.read_threads = 16
  config.data.augment.elastic_prob = 0.5
  config.train.batch_size = 256
  config.train.num_steps = 20_000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.log_every = 50
  config.train.warmup_steps = 500
  config.train.ema_decay = 0.999
  config.parallel.distributed = 'auto'
  return config
