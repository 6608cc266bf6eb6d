"""Building blocks of the U-Net family: the two-conv block, plain or residual."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from resunet_jax.kernels import onednn
from resunet_jax.models import resample


def make_norm(
  kind: str,
  features: int,
  *,
  train: bool,
  groups: int,
  dtype: jnp.dtype,
  param_dtype: jnp.dtype,
  axis_name: str | None,
  name: str,
) -> nn.Module | None:
  """Builds the normalisation layer `kind` for `features` channels, or None for 'none'.

  Args:
    kind: 'none' | 'batch' | 'group' | 'layer'.
    features: channels of the tensor it normalises.
    train: batch statistics (True) or running averages (False) for 'batch'.
    groups: group count for 'group'; reduced to gcd(groups, features) so narrow levels work.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    axis_name: mapped axis over which BatchNorm averages statistics (pmap/shard_map);
      None under jit, where a sharded global batch already gives global statistics.
    name: submodule name.

  Returns:
    A linen module, or None.
  """
  common = {'dtype': dtype, 'param_dtype': param_dtype, 'epsilon': 1e-5, 'name': name}
  if kind == 'none':
    return None
  if kind == 'batch':
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=axis_name, **common)
  if kind == 'group':
    return nn.GroupNorm(num_groups=math.gcd(groups, features), **common)
  if kind == 'layer':
    return nn.LayerNorm(**common)
  raise ValueError(f"unknown norm '{kind}'; valid: none, batch, group, layer")


class ConvTranspose2x2(nn.Module):
  """x2 learned upsampling: `nn.ConvTranspose(features, (2, 2), strides=(2, 2))` as one matmul.

  Same parameters (`kernel` `[2, 2, C_in, features]`, `bias`), initialisers and outputs as
  flax's module. A stride-2 2x2 transposed convolution writes each input pixel to its own 2x2
  output block, so it is `einsum('bhwc,ijco->bhiwjo')` with the kernel flipped in both spatial
  axes (flax's `transpose_kernel=False` convention), then a reshape. XLA's CPU backend lowers
  flax's form to a dilated convolution whose backward pass is 5-8x slower than this matmul
  (benchmarks/README.md); on GPU and TPU both are matmuls.
  """

  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    kernel_shape = (2, 2, channels, self.features)
    kernel = self.param('kernel', nn.linear.default_kernel_init, kernel_shape, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.einsum('bhwc,ijco->bhiwjo', x, kernel[::-1, ::-1])
    return y.reshape(batch, 2 * height, 2 * width, self.features) + bias


def _conv_params(
  module: nn.Module, size: int, channels: int, features: int, param_dtype
) -> tuple[jax.Array, jax.Array]:
  """`nn.Conv`'s parameters, `kernel` `[size, size, channels, features]` and `bias`, with its initialisers."""
  kernel = module.param('kernel', nn.linear.default_kernel_init, (size, size, channels, features), param_dtype)
  bias = module.param('bias', nn.initializers.zeros_init(), (features,), param_dtype)
  return kernel.astype(jnp.float32), bias.astype(jnp.float32)


class ConvReLU(nn.Module):
  """`relu(nn.Conv(features, (k, k), strides, padding='SAME')(x))` as one oneDNN primitive.

  The same parameters (`kernel` `[k, k, C_in, features]`, `bias`), initialisers and values as
  flax's `nn.Conv` followed by `nn.relu`; float32 only (`ConvBlock` uses it for its
  oneDNN-convolution, norm-free, post-activation blocks). See `kernels.onednn.conv_bias_relu`:
  it keeps one activation per convolution for the backward pass instead of two.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = _conv_params(self, self.kernel_size, x.shape[-1], self.features, self.param_dtype)
    return onednn.conv_bias_relu(x.astype(jnp.float32), kernel, bias, (self.stride, self.stride), 'SAME')


class UpsampledConv(nn.Module):
  """`nn.Conv(features, (k, k), padding='SAME')` of `concat([upsample_nearest_2x(x), skip])`, then ReLU if `relu`.

  The same parameters and initialisers as that `nn.Conv` (`kernel` `[k, k, C_x + C_skip,
  features]`); computed by `resample.upsample_concat_conv`, without the upsampled tensor or the
  concatenation. float32; `skip` may be None (the upsampled `x` alone).
  """

  features: int
  kernel_size: int = 3
  relu: bool = True
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None) -> jax.Array:
    channels = x.shape[-1] + (0 if skip is None else skip.shape[-1])
    kernel, bias = _conv_params(self, self.kernel_size, channels, self.features, self.param_dtype)
    skip = None if skip is None else skip.astype(jnp.float32)
    return resample.upsample_concat_conv(x.astype(jnp.float32), skip, kernel, bias, relu=self.relu)


class ConvBlock(nn.Module):
  """Two 3x3 'same' convolutions with ReLU, optionally with a residual shortcut.

  'postact' (the design note): `h = relu(norm2(conv2(relu(norm1(conv1(x))))))`.
  'preact' (He et al. 2016; Zhang et al. 2018): `h = conv2(relu(norm2(conv1(relu(norm1(x))))))`,
  where the first block of the network (`first=True`) applies `conv1` to the raw input.
  With `residual`, the output is `h + residual_scale * shortcut`, no activation after the
  add, where `shortcut = x` when channels and resolution match and a 1x1 convolution with
  bias, `conv_proj`, otherwise. Without `residual` the output is `h`.

  With `upsample`, the block's input is `concat([upsample_nearest_2x(x), skip])` (a decoder
  block: `x` from the level below, `skip` from the encoder, or None).

  With oneDNN's convolutions, float32 and no normalisation ('postact'), each conv and its ReLU
  are one primitive (`ConvReLU`): the same parameters and values, one activation per
  convolution kept for the backward pass instead of two. A decoder block's `conv1` (and
  `conv_proj`) then read `x` and `skip` directly (`UpsampledConv`): no upsampled tensor, no
  concatenation, and for the 3x3 conv 4 taps per pixel on the upsampled part instead of 9.

  Attributes:
    features: output channels.
    residual: add the shortcut.
    preact: 'preact' ordering instead of 'postact'.
    first: preact only: no normalisation/activation before `conv1`.
    stride: stride of `conv1` and `conv_proj` (2 downsamples).
    norm: normalisation kind (see `make_norm`).
    norm_groups: groups for 'group' norm.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    axis_name: BatchNorm's mapped axis (see `make_norm`).
    upsample: the input is `x` upsampled x2 (nearest) and concatenated with `skip`.
  """

  features: int
  residual: bool = False
  preact: bool = False
  first: bool = False
  stride: int = 1
  norm: str = 'none'
  norm_groups: int = 8
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None
  conv_general_dilated: Callable | None = None  # None: XLA's (see kernels.onednn.resolve)
  upsample: bool = False

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, residual_scale: jax.Array | None = None, skip: jax.Array | None = None
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: `[B, H, W, C_in]`.
      train: BatchNorm mode. Positional so that `nn.remat` can mark it static.
      residual_scale: scalar multiplier on the shortcut (apply-time knock-out); None is 1.
      skip: with `upsample`, `[B, 2H, 2W, C_skip]` concatenated after the upsampled `x`, or None.

    Returns:
      `[B, H / stride, W / stride, features]` in `dtype` (`2H, 2W` with `upsample`).
    """
    if skip is not None and not self.upsample:
      raise ValueError('ConvBlock got a skip tensor but upsample=False; a skip joins an upsampled input')

    def conv(features, kernel, stride, name):
      return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding='SAME',
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        conv_general_dilated=self.conv_general_dilated,
        name=name,
      )

    def norm_act(h, name):
      layer = make_norm(
        self.norm,
        h.shape[-1],
        train=train,
        groups=self.norm_groups,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        axis_name=self.axis_name,
        name=name,
      )
      return nn.relu(h if layer is None else layer(h))

    fused = (
      self.conv_general_dilated is onednn.conv_general_dilated
      and self.norm == 'none'
      and not self.preact
      and jnp.dtype(self.dtype) == jnp.float32
      and jnp.dtype(self.param_dtype) == jnp.float32
    )
    decoder_fused = fused and self.upsample and self.stride == 1
    if self.upsample and not decoder_fused:
      x = resample.upsample_concat(x, skip)
    if decoder_fused:
      h = UpsampledConv(self.features, 3, relu=True, name='conv1')(x, skip)
      h = ConvReLU(self.features, 3, 1, name='conv2')(h)
    elif fused:  # conv -> ReLU, as one oneDNN primitive each
      h = ConvReLU(self.features, 3, self.stride, name='conv1')(x)
      h = ConvReLU(self.features, 3, 1, name='conv2')(h)
    elif self.preact:
      h = x if self.first else norm_act(x, 'norm1')
      h = conv(self.features, 3, self.stride, 'conv1')(h)
      h = conv(self.features, 3, 1, 'conv2')(norm_act(h, 'norm2'))
    else:
      h = norm_act(conv(self.features, 3, self.stride, 'conv1')(x), 'norm1')
      h = norm_act(conv(self.features, 3, 1, 'conv2')(h), 'norm2')
    if not self.residual:
      return h
    if decoder_fused:  # x and skip, not yet upsampled and concatenated
      channels = x.shape[-1] + (0 if skip is None else skip.shape[-1])
      if channels != self.features:
        shortcut = UpsampledConv(self.features, 1, relu=False, name='conv_proj')(x, skip)
      else:
        shortcut = resample.upsample_concat(x, skip)
    elif x.shape[-1] != self.features or self.stride != 1:
      shortcut = conv(self.features, 1, self.stride, 'conv_proj')(x)
    else:
      shortcut = x
    if residual_scale is not None:
      shortcut = shortcut * jnp.asarray(residual_scale, shortcut.dtype)
    return h + shortcut
