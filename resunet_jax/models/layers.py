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


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2: `[B, H, W, C]` (H, W even) -> `[B, H/2, W/2, C]` (the note's pooling)."""
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))  # keywords: jax2onnx patches max_pool by keyword


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """x2 nearest-neighbour upsampling, `[B, H, W, C]` -> `[B, 2H, 2W, C]`: each pixel becomes a 2x2 block."""
  batch, height, width, channels = x.shape
  blocks = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
  return blocks.reshape(batch, 2 * height, 2 * width, channels)


def concat_skip(x: jax.Array, skip: jax.Array | None) -> jax.Array:
  """A decoder block's input, `concat([x, skip])` along channels (the U-Net's long skip), or `x` alone."""
  return x if skip is None else jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)


class ConvReLU(nn.Conv):
  """`relu(nn.Conv(...)(x))`: `nn.Conv`'s parameters and attributes, so a set may fuse the two."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return nn.relu(super().__call__(inputs))


class UpsampleConcatConv(nn.Conv):
  """`nn.Conv` of a decoder block's input `concat([up(x), skip])`, then ReLU if `relu`.

  `up` is `upsample_nearest_2x` when `nearest`, else the identity (`x` already has the skip's
  resolution: bilinear or transposed upsampling came first). `nn.Conv`'s parameters, with
  `kernel` `[k, k, C_x + C_skip, features]`; `skip` may be None. A set may compute it without
  building the upsampled tensor or the concatenation (`resunet_jax.cpu`).
  """

  nearest: bool = True
  relu: bool = False

  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:  # type: ignore[override]
    y = super().__call__(concat_skip(upsample_nearest_2x(x) if self.nearest else x, skip))
    return nn.relu(y) if self.relu else y


@dataclasses.dataclass(frozen=True)
class Layers:
  """The layer constructors and functions of a `UNet` (hashable, so a valid module attribute).

  Attributes:
    conv: `nn.Conv`-like module class, called as `conv(features, (k, k), strides=, padding=,
      dtype=, param_dtype=, name=)`.
    conv_relu: the same, with a ReLU after it (`ConvReLU`).
    upsample_conv: a decoder block's first convolution and projection (`UpsampleConcatConv`),
      applied as `(x, skip)`.
    conv_transpose: `nn.ConvTranspose`-like module class for 'transpose' upsampling.
    max_pool: `[B, H, W, C] -> [B, H/2, W/2, C]`.
    upsample: x2 nearest upsampling, `[B, H, W, C] -> [B, 2H, 2W, C]`.
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
