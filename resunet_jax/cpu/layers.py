"""The CPU layer set: `models.Layers` whose convolutions are oneDNN's, with gradients written for XLA's CPU backend.

Each layer has the parameters (names, shapes, initialisers) and values of its stock
counterpart in `models.layers` (to float32 rounding), so variables and checkpoints move freely
between the two sets; benchmarks/README.md has what each one buys. Reverse mode only: the
custom gradients and the oneDNN calls have no forward-mode derivative, and jvp, jacfwd,
linearize or a Hessian-vector product through them raises `ForwardModeError` (or, under `jit`
and `linearize`, JAX's own "can't apply forward-mode autodiff (jvp) to a custom_vjp function");
the stock set (`runtime.backend='stock'`) has every transformation.

`max_pool_2x2` and `upsample_nearest_2x` are the note's pooling and upsampling with gradients
written for XLA's CPU backend. `upsample_concat_conv` is the decoder's first convolution,
`conv(concat([upsample_nearest_2x(low), skip]))`, computed without the upsampled tensor or the
concatenation: a 3x3 convolution of a nearest-upsampled image is, at each of the four output
parities, a 2x2 convolution of the low-resolution image with summed taps (the sub-pixel view of
resize-convolution; Shi et al., CVPR 2016; Odena, Dumoulin & Olah, Distill 2016).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resunet_jax.cpu import onednn
from resunet_jax.models import layers as stock

_NHWC = ('NHWC', 'HWIO', 'NHWC')


@jax.custom_vjp
def _max_pool(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 of `[B, H, W, C]` (H and W even) as a reshape and a max.

  The same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`; on XLA's CPU backend its
  gradient avoids `reduce_window`'s slow select-and-scatter (figures: benchmarks/README.md).
  Tied maxima share a window's gradient (a valid subgradient, as `jnp.max`'s own). The backward
  pass finds the maxima again from the input, which the network keeps anyway (the skip), instead
  of keeping a float32 mask the size of the input. It takes them from the input itself, never by
  comparing the input with the forward's output: compiled by XLA's CPU backend that comparison
  found no equal input in some windows, which made the gradient non-finite
  (tests/cpu/test_layers.py::test_groupnorm_at_an_odd_width_has_the_stock_gradients).
  Reverse mode only, like the oneDNN convolutions.
  """
  return _windows(x).max(axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
  batch, height, width, channels = x.shape
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels)


def _sum_windows(blocks: jax.Array) -> jax.Array:
  """`[B, H/2, 2, W/2, 2, C]` -> `[B, H/2, W/2, C]`: the four positions added elementwise.

  Not `sum(axis=(2, 4))`: XLA's CPU backend hands that reduction to a library call that needs
  its input materialised (the copies and masks the two gradients below avoid).
  """
  return sum(blocks[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1))


def _max_pool_fwd(x):
  return _max_pool(x), x


def _max_pool_bwd(x, g):
  blocks = _windows(x)
  # Elementwise maxima of the four positions: an expression XLA does not merge with the forward's
  # reduction (its output is what the comparison must not read; see `_max_pool`).
  y = functools.reduce(jnp.maximum, (blocks[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)))
  at_max = blocks == y[:, :, None, :, None, :]
  ties = _sum_windows(at_max.astype(g.dtype))  # as a reduction, XLA would materialise the mask early
  share = (g / ties)[:, :, None, :, None, :]
  return (jnp.where(at_max, share, jnp.zeros((), g.dtype)).reshape(x.shape),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
max_pool_2x2 = onednn.reverse_only(_max_pool)


@jax.custom_vjp
def _upsample(x: jax.Array) -> jax.Array:
  """x2 nearest-neighbour upsampling of `[B, H, W, C]`: each pixel becomes a 2x2 block.

  `jnp.repeat` along H and W, with a gradient that adds each 2x2 block of the incoming
  gradient as four strided slices. `jnp.repeat`'s own gradient is a reduction, which XLA's CPU
  backend hands to a library call that needs its input materialised: a copy of the decoder's
  input gradient the size of the upsampled tensor (32 MB at U-Net base 64's finest level, batch
  4, 128x128, held at the training step's peak). Reverse mode only, like `max_pool_2x2`.
  """
  batch, height, width, channels = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels)).reshape(
    batch, 2 * height, 2 * width, channels
  )


def _upsample_fwd(x):
  return _upsample(x), None


def _upsample_bwd(_, g):
  return (_sum_windows(_windows(g)),)


_upsample.defvjp(_upsample_fwd, _upsample_bwd)
upsample_nearest_2x = onednn.reverse_only(_upsample)


def upsample_concat(low: jax.Array, skip: jax.Array | None) -> jax.Array:
  """A decoder block's input: `concat([upsample_nearest_2x(low), skip])`, or the upsampled `low` alone."""
  return stock.concat_skip(upsample_nearest_2x(low), skip)


def _parity_taps() -> np.ndarray:
  """`[16, 9]` 0/1 matrix: row `(u, v, k, l)` sums the 3x3 taps `(p, q)` that make 2x2 tap `(u, v)`.

  Along one axis, for output parity `1 - k`: output row `2i+1` reads upsampled rows `2i, 2i+1,
  2i+2`, that is input rows `i, i, i+1`, so its taps are `(k0 + k1, k2)` on rows `(i, i+1)`
  (`k = 0`). Output row `2i` reads input rows `i-1, i, i`: taps `(k0, k1 + k2)` on rows
  `(i-1, i)` (`k = 1`).
  """
  axis = np.array([[[1, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 1]]], np.float32)  # [k, u, p]
  return np.einsum('kup,lvq->uvklpq', axis, axis).reshape(16, 9)


_PARITY_TAPS = _parity_taps()


def _upsampled_conv3x3(low: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3_same(upsample_nearest_2x(low), kernel)` (no bias) from `low` itself.

  Each output parity is a 2x2 convolution of `low` with summed taps (`_parity_taps`). One 2x2
  convolution of `low`, padded by one on every side, with the four parities' kernels side by
  side (`[2, 2, C, 4F]`, parity `(1 - k, 1 - l)` at group `2k + l`), gives a `[B, H+1, W+1, 4F]`
  map `m`. Its depth-to-space `d` (`d[2u + k, 2v + l] = m[u, v, group 2k + l]`) holds output
  pixel `(2i + a, 2j + b)` at `(2i + a + 1, 2j + b + 1)`: from `(i + a, j + b)`, group
  `(1 - a, 1 - b)`. So the output is `d[1 : 2H + 1, 1 : 2W + 1]`. Per output pixel that is 4 taps
  where the direct form reads 9, with 1/(H+1) + 1/(W+1) more positions.
  """
  batch, height, width, channels = low.shape
  features = kernel.shape[-1]
  # One small matrix product (as adds and stacks, XLA compiled the step 40% slower).
  taps = jnp.asarray(_PARITY_TAPS, kernel.dtype) @ kernel.reshape(9, channels * features)
  stacked = taps.reshape(2, 2, 2, 2, channels, features).transpose(0, 1, 4, 2, 3, 5)  # [u, v, C, k, l, F]
  stacked = stacked.reshape(2, 2, channels, 4 * features)
  maps = onednn.conv_general_dilated(low, stacked, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
  blocks = maps.reshape(batch, height + 1, width + 1, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
  spread = blocks.reshape(batch, 2 * height + 2, 2 * width + 2, features)
  return spread[:, 1 : 2 * height + 1, 1 : 2 * width + 1]


def upsample_concat_conv(
  low: jax.Array, skip: jax.Array | None, kernel: jax.Array, bias: jax.Array, *, relu: bool
) -> jax.Array:
  """`conv_same(concat([upsample_nearest_2x(low), skip]), kernel) + bias`, then ReLU if `relu`.

  The decoder's first convolution (3x3) or projection shortcut (1x1) without the upsampled
  tensor or the concatenation: `kernel` (`[k, k, C_low + C_skip, F]`, k = 1 or 3) is split by
  input channel; the upsampled part is `_upsampled_conv3x3`, or for k = 1 the convolution of
  `low` upsampled afterwards (a 1x1 convolution commutes with nearest upsampling); the skip's
  part is one `onednn.conv_bias_add` that adds it, the bias and the ReLU. With `skip=None` the
  input is the upsampled `low` alone. At the design note's U-Net (skip width F, `low` 2F) the 3x3
  form does 68/108 of the direct form's multiply-adds (+ the border positions); the values match
  it to float32 rounding (the summed taps round differently).
  """
  channels = low.shape[-1]
  size = kernel.shape[0]
  expected = channels + (0 if skip is None else skip.shape[-1])
  if kernel.shape[:3] != (size, size, expected) or size not in (1, 3):
    raise ValueError(f'upsample_concat_conv needs a [1|3, 1|3, {expected}, F] kernel; got {kernel.shape}')
  batch, height, width, _ = low.shape
  if size == 3 and batch * height * width < channels:
    # Fewer input positions than channels: the step is bound by reading the kernels, which the
    # four parities' form makes 16/9 as large (and assembles and reorders on every call), so it
    # gains nothing there (benchmarks/README.md).
    x = upsample_concat(low, skip)
    if relu:
      return onednn.conv_bias_relu(x, kernel, bias)
    return onednn.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=_NHWC) + bias
  up_kernel = kernel[:, :, :channels]
  if size == 3:
    z = _upsampled_conv3x3(low, up_kernel)
  else:
    z = upsample_nearest_2x(onednn.conv_general_dilated(low, up_kernel, (1, 1), 'VALID', dimension_numbers=_NHWC))
  if skip is None:
    y = z + bias
    return jax.nn.relu(y) if relu else y
  return onednn.conv_bias_add(skip, kernel[:, :, channels:], bias, z, relu=relu)


class ConvTranspose2x2(nn.ConvTranspose):
  """x2 learned upsampling, `nn.ConvTranspose(features, (2, 2), strides=(2, 2))`, as one matmul.

  Same parameters (`kernel` `[2, 2, C_in, features]`, `bias`), initialisers and outputs as
  flax's module. A stride-2 2x2 transposed convolution writes each input pixel to its own 2x2
  output block, so it is `einsum('bhwc,ijco->bhiwjo')` with the kernel flipped in both spatial
  axes (flax's `transpose_kernel=False` convention), then a reshape. XLA's CPU backend lowers
  flax's form to a dilated convolution whose backward pass is several times slower than this
  matmul (benchmarks/README.md). Other kernel sizes and strides run flax's module.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if (
      tuple(self.kernel_size) != (2, 2)
      or _pair(self.strides) != (2, 2)
      or self.padding != 'SAME'
      or self.transpose_kernel
      or not self.use_bias
      or inputs.ndim != 4
    ):
      return nn.ConvTranspose.__call__(self, inputs)
    batch, height, width, channels = inputs.shape
    kernel = self.param('kernel', self.kernel_init, (2, 2, channels, self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = jnp.einsum('bhwc,ijco->bhiwjo', x, kernel[::-1, ::-1])
    return y.reshape(batch, 2 * height, 2 * width, self.features) + bias


def _fusable(module: nn.Conv, x: jax.Array, stride: int = 1) -> bool:
  """Whether a oneDNN primitive computes `module` (an `nn.Conv`) on `x`: float32, NHWC, plain 'SAME'."""
  size = tuple(module.kernel_size)
  return (
    x.ndim == 4
    and jnp.dtype(x.dtype) == jnp.float32
    and jnp.dtype(module.dtype or jnp.float32) == jnp.float32
    and jnp.dtype(module.param_dtype) == jnp.float32
    and module.padding == 'SAME'
    and module.use_bias
    and module.feature_group_count == 1
    and _pair(module.kernel_dilation) == (1, 1)
    and _pair(module.input_dilation) == (1, 1)
    and len(size) == 2
    and size[0] == size[1]
    and _pair(module.strides) == (stride, stride)
  )


def _conv_params(module: nn.Conv, channels: int) -> tuple[jax.Array, jax.Array]:
  """`nn.Conv`'s parameters, `kernel` `[k, k, channels, features]` and `bias`, with its initialisers."""
  shape = (*module.kernel_size, channels, module.features)
  kernel = module.param('kernel', module.kernel_init, shape, module.param_dtype)
  bias = module.param('bias', module.bias_init, (module.features,), module.param_dtype)
  return kernel, bias


def _pair(value) -> tuple[int, ...]:
  """`nn.Conv`'s strides or dilation (None, an int or a sequence) as a tuple per spatial axis."""
  if value is None:
    return (1, 1)
  return (value, value) if isinstance(value, int) else tuple(value)


def _stride(module: nn.Conv) -> int:
  return _pair(module.strides)[0]


class ConvReLU(stock.ConvReLU):
  """`stock.ConvReLU` (`relu(nn.Conv(x))`) as one oneDNN primitive where it can be (`onednn.conv_bias_relu`).

  It keeps one activation per convolution for the backward pass instead of two
  (benchmarks/README.md, "Memory"). Other dtypes and configurations run the stock layer.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    stride = _stride(self)
    if not _fusable(self, inputs, stride):
      return nn.relu(nn.Conv.__call__(self, inputs))
    kernel, bias = _conv_params(self, inputs.shape[-1])
    return onednn.conv_bias_relu(inputs, kernel, bias, (stride, stride), 'SAME')


class UpsampleConcatConv(stock.UpsampleConcatConv):
  """`stock.UpsampleConcatConv` computed by `upsample_concat_conv` (no upsampled tensor, no concatenation).

  Where `nearest` and float32; otherwise the stock layer, with this set's upsampling.
  """

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:  # type: ignore[override]
    channels = x.shape[-1] + (0 if skip is None else skip.shape[-1])
    size = self.kernel_size[0]
    if not (self.nearest and size in (1, 3) and _fusable(self, x)):
      y = nn.Conv.__call__(self, stock.concat_skip(upsample_nearest_2x(x) if self.nearest else x, skip))
      return nn.relu(y) if self.relu else y
    kernel, bias = _conv_params(self, channels)
    skip = None if skip is None else skip.astype(jnp.float32)
    return upsample_concat_conv(x, skip, kernel, bias, relu=self.relu)


Conv = functools.partial(nn.Conv, conv_general_dilated=onednn.conv_general_dilated)


def layers() -> stock.Layers:
  """The CPU layer set; builds and loads the oneDNN handlers first (raises `onednn.OneDNNUnavailable`)."""
  onednn.load()
  return LAYERS


LAYERS = stock.Layers(
  conv=Conv,
  conv_relu=ConvReLU,
  upsample_conv=UpsampleConcatConv,
  conv_transpose=ConvTranspose2x2,
  max_pool=max_pool_2x2,
  upsample=upsample_nearest_2x,
  name='cpu',
)
