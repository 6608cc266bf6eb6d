"""A PyTorch port of `resunet_jax.models.UNet`, for side-by-side benchmarks only.

The same layers in the same order with the same parameter counts (`benchmarks/train_step.py`
checks), in 2D or 3D (`spatial_dims`: 3x3x3 convolutions on NCDHW volumes): two 3x3 convs per
block (post- or pre-activation), an optional 1x1 projection shortcut, 2x2 max-pool or stride-2
downsampling, nearest x2 upsampling, [upsampled, skip] concatenation and a 1x1 head. Two details
differ and do not change the cost: PyTorch pads a stride-2 3x3 conv by 1 on both sides where
XLA's 'SAME' pads 0 before and 1 after, and its BatchNorm momentum is written 0.1 where Flax
writes 0.9.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (PyTorch's own convention)


class Block(nn.Module):
  """`resunet_jax.models.blocks.ConvBlock` in PyTorch (NCHW)."""

  def __init__(
    self,
    cin: int,
    cout: int,
    *,
    residual: bool,
    preact: bool,
    first: bool,
    stride: int,
    batch_norm: bool,
    spatial_dims: int = 2,
  ):
    super().__init__()
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if spatial_dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    self.preact, self.first = preact, first
    self.conv1 = conv(cin, cout, 3, stride, padding=1)
    self.conv2 = conv(cout, cout, 3, 1, padding=1)
    norm1_channels = cin if preact else cout
    self.norm1 = norm(norm1_channels) if batch_norm and not (preact and first) else nn.Identity()
    self.norm2 = norm(cout) if batch_norm else nn.Identity()
    self.conv_proj = conv(cin, cout, 1, stride) if residual and (cin != cout or stride != 1) else None
    self.residual = residual

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.preact:
      h = x if self.first else F.relu(self.norm1(x))
      h = self.conv2(F.relu(self.norm2(self.conv1(h))))
    else:
      h = F.relu(self.norm1(self.conv1(x)))
      h = F.relu(self.norm2(self.conv2(h)))
    if not self.residual:
      return h
    return h + (x if self.conv_proj is None else self.conv_proj(x))


class UNet(nn.Module):
  """`resunet_jax.models.UNet` with nearest upsampling and every skip (`fields(config)` gives the
  arguments of a `ModelConfig`, so that this module needs neither JAX nor our package).

  Args:
    widths: channels of levels 0..depth-1 and of the bottleneck (`ModelConfig.widths()`).
    residual: shortcuts in every block.
    block: 'postact' or 'preact'.
    norm: 'none' or 'batch'.
    downsample: 'maxpool' or 'stride'.
    num_classes: output channels.
    in_channels: input channels.
    spatial_dims: 2 (NCHW images) or 3 (NCDHW volumes).
  """

  def __init__(self, *, widths, residual, block, norm, downsample, num_classes=1, in_channels=3, spatial_dims=2):
    super().__init__()
    if norm not in ('none', 'batch'):
      raise ValueError(f"the PyTorch port covers norm 'none' and 'batch', not {norm!r}")
    self.depth, self.stride_down = len(widths) - 1, downsample == 'stride'
    self.pool = F.max_pool2d if spatial_dims == 2 else F.max_pool3d
    common = {'residual': residual, 'preact': block == 'preact', 'batch_norm': norm == 'batch'}
    common['spatial_dims'] = spatial_dims
    self.encoder = nn.ModuleList()
    channels = in_channels
    for level, width in enumerate(widths):
      stride = 2 if level > 0 and self.stride_down else 1
      self.encoder.append(Block(channels, width, first=level == 0, stride=stride, **common))
      channels = width
    self.decoder = nn.ModuleList()
    for width in reversed(widths[:-1]):
      self.decoder.append(Block(channels + width, width, first=False, stride=1, **common))
      channels = width
    self.head = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(channels, num_classes, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    skips = []
    for level, block in enumerate(self.encoder):
      if level > 0 and not self.stride_down:
        x = self.pool(x, 2)
      x = block(x)
      skips.append(x)
    skips.pop()
    for block in self.decoder:
      x = F.interpolate(x, scale_factor=2, mode='nearest')
      x = block(torch.cat([x, skips.pop()], dim=1))
    return self.head(x)


def fields(config) -> dict:
  """The `UNet` arguments of a `resunet_jax.models.ModelConfig`."""
  if config.upsample != 'nearest' or not all(config.skip_levels) or config.pool_strides or config.width_scale != 1:
    raise ValueError('the PyTorch port covers nearest upsampling with every skip, stride 2 and unscaled widths')
  return {
    'widths': list(config.widths()),
    'residual': config.residual,
    'block': config.block,
    'norm': config.norm,
    'downsample': config.downsample,
    'num_classes': config.num_classes,
    'spatial_dims': config.spatial_dims,
  }
