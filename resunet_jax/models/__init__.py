"""The U-Net / ResUNet model family: `ModelConfig`, presets and the `UNet` module."""

from resunet_jax.models import summary
from resunet_jax.models.blocks import ConvBlock, make_norm
from resunet_jax.models.config import PRESETS, ModelConfig, preset
from resunet_jax.models.unet import UNet, block_names, count_params

__all__ = [
  'PRESETS',
  'ConvBlock',
  'ModelConfig',
  'UNet',
  'block_names',
  'count_params',
  'make_norm',
  'preset',
  'summary',
]
