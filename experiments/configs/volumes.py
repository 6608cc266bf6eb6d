"""3-D volumes on a 2-core CPU: `python experiments/train.py --model=resunet --config=experiments/configs/volumes.py`.

Trains a 3-D network on the embedded `synthetic_vessels` (64^3 volumes of thin branching tubes at
1 mm, built locally on first use) from 32^3 patches, a third of them forced to hold vessel
(nnU-Net's sampler), and scores every validation volume whole through the 3-D Gaussian sliding
window, with surface Dice and HD95 in mm. The dataset's dimensions make the network 3-D
(`model.spatial_dims` and `model.pool_strides` follow the data: `training.loop.resolve`).
Dice + cross-entropy with a clDice term for the thin tubes (Shit et al., CVPR 2021).
`--config.data.name=synthetic_vessels/anisotropic` trains on the (2, 1, 1) mm copy, whose first
level then pools in-plane only. The stated target and its measurement are in benchmarks/README.md
("Volumes").
"""

import ml_collections

from resunet_jax import configs


def get_config() -> ml_collections.ConfigDict:
  """Returns the volumes config."""
  config = configs.base_config()
  config.model.base_width = 8
  config.model.depth = 3
  config.data.name = 'synthetic_vessels'
  config.data.patch_size = 32
  config.data.evaluation = 'whole'
  config.data.augment.rot90 = True
  config.train.batch_size = 2
  config.train.num_steps = 600
  config.train.eval_every = 200
  config.train.checkpoint_every = 100
  config.train.warmup_steps = 20
  config.train.learning_rate = 2e-3
  config.train.cldice_weight = 0.5
  config.train.num_sample_images = 2
  return config
