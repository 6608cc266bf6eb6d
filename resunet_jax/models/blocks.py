"""Building blocks of the U-Net family: the two-conv block, plain or residual, encoder or decoder."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from resunet_jax.models import layers as layers_lib


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


KERNEL_INITS = {
  'lecun': nn.initializers.lecun_normal(),
  'glorot': nn.initializers.glorot_uniform(),
  'he': nn.initializers.he_normal(),
}
"""`ModelConfig.init` -> the kernel initialiser of the blocks' convolutions."""


class ConvBlock(nn.Module):
  """Two 3x3 'same' convolutions with ReLU, optionally with a residual shortcut.

  'postact' (the design note): `h = relu(norm2(conv2(relu(norm1(conv1(u))))))`.
  'preact' (He et al. 2016; Zhang et al. 2018): `h = conv2(relu(norm2(conv1(relu(norm1(u))))))`,
  where the first block of the network (`first=True`) applies `conv1` to the raw input.
  With `residual`, the output is `h + residual_scale * shortcut`, no activation after the
  add. `shortcut='projection'`: `shortcut = u` when channels and resolution match and a 1x1
  convolution with bias, `conv_proj`, otherwise. `shortcut='identity'`: where they do not
  match, a 1x1 convolution `conv_in` (with the block's stride) first maps `u` to `p`, the two
  3x3 convolutions read `p`, and `shortcut = p`. Without `residual` the output is `h`.

  `u` is the block's input: `x` for an encoder block or the bottleneck; for a decoder block
  (`upsample` set) `concat([up(x), skip])`, `x` from the level below upsampled x2 ('nearest',
  'bilinear', or 'transpose': a learned 2x2 stride-2 transposed convolution `up`, as in the
  U-Net paper) and `skip` the encoder's tensor of this level, or None. Every layer comes from
  `layers` (see `models.layers`); a decoder's `conv1` and `conv_proj` take `(x, skip)`, so a
  layer set may convolve `u` without building it.

  Attributes:
    features: output channels.
    residual: add the shortcut.
    shortcut: 'projection' | 'identity' (see above; `ModelConfig.shortcut`).
    initializer: kernel initialiser name, a key of `KERNEL_INITS` (`ModelConfig.init`).
    preact: 'preact' ordering instead of 'postact'.
    first: preact only: no normalisation/activation before `conv1`.
    stride: stride of `conv1` and `conv_proj` (2 downsamples), or one per spatial axis.
    norm: normalisation kind (see `make_norm`).
    norm_groups: groups for 'group' norm.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    axis_name: BatchNorm's mapped axis (see `make_norm`).
    upsample: None (not a decoder block) or how `x` is upsampled: 'nearest' | 'bilinear' | 'transpose'.
    factors: decoder blocks: the upsampling factor of each spatial axis (the level's pooling
      strides); None is 2 on each.
    layers: the layer set (`models.layers.STOCK`: Flax's and lax's).
  """

  features: int
  residual: bool = False
  shortcut: str = 'projection'
  initializer: str = 'lecun'
  preact: bool = False
  first: bool = False
  stride: int | tuple[int, ...] = 1
  norm: str = 'none'
  norm_groups: int = 8
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None
  upsample: str | None = None
  factors: tuple[int, ...] | None = None
  layers: layers_lib.Layers = layers_lib.STOCK

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool,
    residual_scale: jax.Array | None = None,
    skip: jax.Array | None = None,
    branch_scale: jax.Array | None = None,
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: `[B, H, W, C_in]` (`[B, D, H, W, C_in]` for a volume).
      train: BatchNorm mode. Positional so that `nn.remat` can mark it static.
      residual_scale: scalar multiplier on the shortcut (apply-time knock-out); None is 1.
      skip: decoder blocks: `[B, 2H, 2W, C_skip]` concatenated after the upsampled `x`, or None.
      branch_scale: scalar multiplier on the residual branch (apply-time knock-out: 0 keeps the
        shortcut alone); None is 1.

    Returns:
      `[B, H / stride, W / stride, features]` in `dtype` (`2H, 2W` for a decoder block).
    """
    if skip is not None and self.upsample is None:
      raise ValueError('ConvBlock got a skip tensor but upsample=None; a skip joins an upsampled input')
    layers = self.layers
    kernel_init = KERNEL_INITS[self.initializer]
    common = {'padding': 'SAME', 'dtype': self.dtype, 'param_dtype': self.param_dtype, 'kernel_init': kernel_init}
    dims = x.ndim - 2
    factors = (2,) * dims if self.factors is None else tuple(self.factors)
    block_stride = (self.stride,) * dims if isinstance(self.stride, int) else tuple(self.stride)

    def conv(h, kernel, stride, name, relu=False):
      module = layers.conv_relu if relu else layers.conv
      strides = (stride,) * dims if isinstance(stride, int) else stride
      return module(self.features, (kernel,) * dims, strides=strides, name=name, **common)(h)

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

    if self.upsample == 'transpose':
      up = layers.conv_transpose(
        self.features,
        factors,
        strides=factors,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=kernel_init,
        name='up',
      )
      x = up(x)
    elif self.upsample == 'bilinear':
      shape = (x.shape[0], *(n * f for n, f in zip(x.shape[1:-1], factors, strict=True)), x.shape[-1])
      x = jax.image.resize(x, shape, method='bilinear')  # linear on every axis, in 3D too
    nearest = self.upsample == 'nearest'
    in_channels = x.shape[-1] + (0 if skip is None else skip.shape[-1])
    reshapes = in_channels != self.features or set(block_stride) != {1}

    def block_input():  # u, built only where the block reads it whole (a preact norm, an identity shortcut)
      if self.upsample is None:
        return x
      if not nearest:
        return layers_lib.concat_skip(x, skip)
      up = layers.upsample(x) if self.factors is None else layers.upsample(x, factors)  # a set serves the default
      return layers_lib.concat_skip(up, skip)

    def conv_of_input(kernel, name, relu):
      if self.upsample is None:
        return conv(x, kernel, block_stride, name, relu)
      extra = {} if self.factors is None else {'factors': factors}  # the default keeps a set's own class
      module = layers.upsample_conv(
        self.features, (kernel,) * dims, nearest=nearest, relu=relu, name=name, **common, **extra
      )
      return module(x, skip)

    entry = None  # 'identity' shortcuts: `p`, the input mapped to the block's shape, which the body reads
    if self.residual and self.shortcut == 'identity' and reshapes:
      entry = conv(block_input(), 1, block_stride, 'conv_in') if self.preact else conv_of_input(1, 'conv_in', False)
    stride = block_stride if entry is None else 1

    def whole_input():
      return block_input() if entry is None else entry

    def first_conv(relu):
      return conv_of_input(3, 'conv1', relu) if entry is None else conv(entry, 3, 1, 'conv1', relu)

    if self.preact:
      u = whole_input()
      h = u if self.first and entry is None else norm_act(u, 'norm1')
      h = conv(h, 3, stride, 'conv1')
      h = conv(norm_act(h, 'norm2'), 3, 1, 'conv2')
    elif self.norm == 'none':  # conv -> ReLU: one `conv_relu` each (a layer set may fuse them)
      h = conv(first_conv(relu=True), 3, 1, 'conv2', relu=True)
    else:
      h = norm_act(first_conv(relu=False), 'norm1')
      h = norm_act(conv(h, 3, 1, 'conv2'), 'norm2')
    if not self.residual:
      return h
    if entry is not None:
      shortcut = entry
    elif reshapes:
      shortcut = conv(u, 1, block_stride, 'conv_proj') if self.preact else conv_of_input(1, 'conv_proj', relu=False)
    else:
      shortcut = u if self.preact else block_input()
    if residual_scale is not None:
      shortcut = shortcut * jnp.asarray(residual_scale, shortcut.dtype)
    if branch_scale is not None:
      h = h * jnp.asarray(branch_scale, h.dtype)
    return h + shortcut


def bilinear_2x(x: jax.Array, factors: tuple[int, ...] | None = None) -> jax.Array:
  """`[B, H, W, C] -> [B, 2H, 2W, C]`: `jax.image.resize(..., 'bilinear')` at exactly x2 (half-pixel
  centres, edges clamped), written with slices and a reshape so that it exports with symbolic
  sizes, to ONNX too (jax2onnx cannot convert `resize` with a dynamic batch). In general x2 along
  each spatial axis whose entry of `factors` is 2 (None: every axis), unchanged along the others."""

  def along(a: jax.Array, axis: int) -> jax.Array:
    size = a.shape[axis]
    first, last = jax.lax.slice_in_dim(a, 0, 1, axis=axis), jax.lax.slice_in_dim(a, size - 1, size, axis=axis)
    before = jnp.concatenate([first, jax.lax.slice_in_dim(a, 0, size - 1, axis=axis)], axis)
    after = jnp.concatenate([jax.lax.slice_in_dim(a, 1, size, axis=axis), last], axis)
    pairs = jnp.stack([0.75 * a + 0.25 * before, 0.75 * a + 0.25 * after], axis + 1)
    return pairs.reshape((*a.shape[:axis], 2 * size, *a.shape[axis + 1 :]))

  for axis, factor in enumerate((2,) * (x.ndim - 2) if factors is None else factors, start=1):
    if factor == 2:
      x = along(x, axis)
  return x


class AttentionGate(nn.Module):
  """The additive attention gate of Oktay et al. (2018, "Attention U-Net", eq. 1-2) on one skip.

  `alpha = up(sigmoid(psi(relu(W_x(x) + W_g(g)))))` and the output is `x * alpha`: `x` the
  skip `[B, H, W, C]`, `g` the gating signal, the decoder tensor one level below `[B, H/2, W/2,
  C_g]`; `W_x` a 1x1 convolution with stride 2 and no bias (the skip brought to the gating
  signal's grid, as in the paper), `W_g` and `psi` 1x1 convolutions with bias (`features`
  intermediate channels, then one), `up` bilinear resampling of the one-channel map to `x`'s grid.
  In 3D the same with `[B, D, H, W, C]` and 1x1x1 convolutions; `factors` is the stride from the
  skip's grid to the gating signal's (None: 2 on each axis).

  Attributes:
    features: intermediate channels (`F_int`).
    factors: per spatial axis, the skip's size over the gating signal's (None: 2 each).
    initializer: `ModelConfig.init` name of the kernels' initialiser.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    layers: the layer set (`models.layers`); its `conv` builds the three convolutions.
  """

  features: int
  initializer: str = 'lecun'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  layers: layers_lib.Layers = layers_lib.STOCK
  factors: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, g: jax.Array, opened: jax.Array | None = None) -> jax.Array:
    """`x` gated by `g`; `opened` (a scalar in [0, 1], apply-time) moves the gate towards ones:
    `alpha + opened * (1 - alpha)`, so 1 passes the plain skip (the gate's knock-out)."""
    dims = x.ndim - 2
    factors = (2,) * dims if self.factors is None else tuple(self.factors)
    common = {
      'kernel_size': (1,) * dims,
      'dtype': self.dtype,
      'param_dtype': self.param_dtype,
      'kernel_init': KERNEL_INITS[self.initializer],
    }
    theta = self.layers.conv(self.features, strides=factors, use_bias=False, name='W_x', **common)(x)
    phi = self.layers.conv(self.features, name='W_g', **common)(g)
    q = self.layers.conv(1, name='psi', **common)(nn.relu(theta + phi))
    alpha = bilinear_2x(nn.sigmoid(q.astype(jnp.float32)), factors)
    if opened is not None:
      alpha = alpha + opened * (1 - alpha)
    return x * alpha.astype(x.dtype)
