r"""MoNuSeg 2018 (H&E nuclei, 40x, 1000x1000 RGB tiles), read from a user's copy.

  export MONUSEG_DIR=/path/to/MoNuSeg    # holds {Train,Val,Test}_Folder/{img,labelcol}
  python experiments/train.py --model=unet --config=experiments/configs/monuseg.py           # native
  python experiments/train.py --model=unet --config=experiments/configs/monuseg.py:paper     # 224x224

The data (Kumar et al., IEEE TMI 2017 and 2020; licence CC BY-NC-SA 4.0) never ships with this
project. The 24/6/14 split UCTransNet reports on (Wang et al., AAAI 2022) is in the public
repository McGregorWwww/UCTransNet under datasets/MoNuSeg/: test images are TIFF, train and
validation PNG, masks PNG of 0 and 255. `--config.data.folder=PATH` works as MONUSEG_DIR does.

Two protocols:
- 'native' (default): training patches of 256x256 cut at scale 1 (a third placed on a nucleus),
  every validation and test image scored whole at 1000x1000 through the sliding window.
- 'paper': UCTransNet's protocol, every image resized to 224x224 for training and testing
  (no random crop: `crop_scale` (1, 1)), Dice and IoU per test image at 224x224.
Both: a U-Net with BatchNorm and transposed-conv upsampling as UCTransNet's, at base width 16 for
a CPU (theirs is 64: `--config.model.base_width=64`), Adam(W) 1e-3, batch 4.
"""

import os

import ml_collections

from resunet_jax import configs

PROTOCOLS = ('native', 'paper')
HINT = 'MoNuSeg: the UCTransNet split is in the repository McGregorWwww/UCTransNet, datasets/MoNuSeg; set MONUSEG_DIR'


def get_config(protocol: str = 'native') -> ml_collections.ConfigDict:
  """Returns the MoNuSeg config of `protocol` ('native' | 'paper')."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'monuseg.py:{protocol} is not a protocol; use one of {", ".join(PROTOCOLS)}')
  config = configs.base_config()
  config.preset = 'unet'
  config.model.base_width = 16
  config.model.norm = 'batch'
  config.model.upsample = 'transpose'
  config.data.name = 'folder'
  config.data.folder = os.environ.get('MONUSEG_DIR', '')
  config.data.folder_hint = HINT
  config.data.folder_layout = {
    'splits': {'train': 'Train_Folder', 'validation': 'Val_Folder', 'test': 'Test_Folder'},
    'images': 'img',
    'masks': 'labelcol',
  }
  config.train.batch_size = 4
  config.train.learning_rate = 1e-3
  config.train.num_steps = 2000
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.train.warmup_steps = 50
  if protocol == 'paper':
    config.data.image_size = 224
    config.data.augment.crop_scale = (1.0, 1.0)
  else:
    config.data.image_size = 256
    config.data.patch_size = 256
    config.data.evaluation = 'whole'
  return config
