"""The U-Net / ResUNet model family: `ModelConfig`, presets, the `UNet` module and its `Layers` (plain Flax and lax)."""

from resunet_jax.models import layers, summary
from resunet_jax.models.blocks import ConvBlock, make_norm
from resunet_jax.models.config import PRESETS, ModelConfig, pool_strides_for_spacing, preset
from resunet_jax.models.layers import STOCK, Layers
from resunet_jax.models.unet import (
  UNet,
  block_names,
  count_params,
  matched_width_scale,
  nested_nodes,
  param_count,
  prune,
)

__all__ = [
  'PRESETS',
  'STOCK',
  'ConvBlock',
  'Layers',
  'ModelConfig',
  'pool_strides_for_spacing',
  'UNet',
  'block_names',
  'count_params',
  'layers',
  'make_norm',
  'matched_width_scale',
  'nested_nodes',
  'param_count',
  'preset',
  'prune',
  'summary',
]
