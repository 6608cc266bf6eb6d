"""The layers a `UNet` is built from, as one injectable set (`Layers`); the stock set is Flax's and lax's.

`Layers` is the model's one injection point for platform-specific kernels, as flax's ImageNet
ResNet takes its `conv`: every convolution, the 2x2 max-pool, the x2 nearest upsampling and the
transposed convolution of a `UNet` come from it. A replacement set must keep each layer's
parameters (names, shapes, initialisers) and values, so that variables and checkpoints move
freely between sets; `resunet_jax.cpu.layers()` is such a set for XLA's CPU backend. The stock
set, `STOCK`, uses only `flax.linen` and `jax.lax`: every JAX transformation (grad, jvp, vmap,
remat, `jax.export`) goes through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any


def max_pool_2x2(x: jax.Array, window: tuple[int, ...] | None = None) -> jax.Array:
  """Max-pool with window = stride: `[B, *spatial, C]` -> each axis divided by its `window` entry.

  `window` None is 2 on every axis: `[B, H, W, C]` (H, W even) -> `[B, H/2, W/2, C]`, the note's
  2x2 pooling; a volume's `(1, 2, 2)` keeps its depth (`ModelConfig.pool_strides`).
  """
  window = (2,) * (x.ndim - 2) if window is None else tuple(window)
  return nn.max_pool(x, window_shape=window, strides=window)  # keywords: jax2onnx patches max_pool by keyword


def upsample_nearest_2x(x: jax.Array, factors: tuple[int, ...] | None = None) -> jax.Array:
  """Nearest-neighbour upsampling by `factors` per spatial axis (None: 2 on each), `[B, *spatial, C]`:
  each pixel of `[B, H, W, C]` becomes a 2x2 block of `[B, 2H, 2W, C]`."""
  factors = (2,) * (x.ndim - 2) if factors is None else tuple(factors)
  spatial = x.shape[1:-1]
  expanded = x[(slice(None), *(item for _ in spatial for item in (slice(None), None)), slice(None))]
  shape = (x.shape[0], *(item for size, f in zip(spatial, factors, strict=True) for item in (size, f)), x.shape[-1])
  blocks = jnp.broadcast_to(expanded, shape)
  return blocks.reshape(x.shape[0], *(size * f for size, f in zip(spatial, factors, strict=True)), x.shape[-1])


def concat_skip(x: jax.Array, skip: jax.Array | None) -> jax.Array:
  """A decoder block's input, `concat([x, skip])` along channels (the U-Net's long skip), or `x` alone."""
  return x if skip is None else jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)


class ConvReLU(nn.Conv):
  """`relu(nn.Conv(...)(x))`: `nn.Conv`'s parameters and attributes, so a set may fuse the two."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return nn.relu(super().__call__(inputs))


class UpsampleConcatConv(nn.Conv):
  """`nn.Conv` of a decoder block's input `concat([up(x), skip])`, then ReLU if `relu`.

  `up` is `upsample_nearest_2x` by `factors` (None: 2 on each axis) when `nearest`, else the
  identity (`x` already has the skip's resolution: bilinear or transposed upsampling came first).
  `nn.Conv`'s parameters, with `kernel` `[k, k, C_x + C_skip, features]` (`[k, k, k, ...]` in
  3D); `skip` may be None. A set may compute it without building the upsampled tensor or the
  concatenation (`resunet_jax.cpu`).
  """

  nearest: bool = True
  relu: bool = False
  factors: tuple[int, ...] | None = None

  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:  # type: ignore[override]
    y = super().__call__(concat_skip(upsample_nearest_2x(x, self.factors) if self.nearest else x, skip))
    return nn.relu(y) if self.relu else y


@dataclasses.dataclass(frozen=True)
class Layers:
  """The layer constructors and functions of a `UNet` (hashable, so a valid module attribute).

  Attributes:
    conv: `nn.Conv`-like module class, called as `conv(features, (k, k), strides=, padding=,
      dtype=, param_dtype=, name=)` (a 3-tuple kernel for volumes).
    conv_relu: the same, with a ReLU after it (`ConvReLU`).
    upsample_conv: a decoder block's first convolution and projection (`UpsampleConcatConv`),
      applied as `(x, skip)`.
    conv_transpose: `nn.ConvTranspose`-like module class for 'transpose' upsampling.
    max_pool: `max_pool(x, window)`, `[B, H, W, C] -> [B, H/2, W/2, C]` for the default window.
    upsample: nearest upsampling `upsample(x, factors)`, `[B, H, W, C] -> [B, 2H, 2W, C]` by default.
    A set needs only to serve `ModelConfig.planar` networks (2D, stride 2): `runtime.layers`
    gives volumes and other strides the stock set.
    name: what the set is called in logs and summaries.
  """

  conv: ModuleDef = nn.Conv
  conv_relu: ModuleDef = ConvReLU
  upsample_conv: ModuleDef = UpsampleConcatConv
  conv_transpose: ModuleDef = nn.ConvTranspose
  max_pool: Callable[[jax.Array], jax.Array] = max_pool_2x2
  upsample: Callable[[jax.Array], jax.Array] = upsample_nearest_2x
  name: str = 'stock'


STOCK = Layers()
