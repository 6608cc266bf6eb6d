"""Segmentation losses: cross-entropy and soft Dice (optax's), weighted, over valid examples.

A model with one output channel is binary (sigmoid, masks in {0, 1}); with K > 1 channels it
is a K-class softmax over integer masks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the loss terms (hashable: a static argument of the jitted step).

  Attributes:
    cross_entropy: weight of sigmoid BCE (1 output) or softmax cross-entropy (K outputs).
    dice: weight of the soft Dice loss (optax's, smooth 1, per image).
  """

  cross_entropy: float = 1.0
  dice: float = 1.0


def per_example_loss(logits: jax.Array, masks: jax.Array, weights: LossWeights) -> jax.Array:
  """The weighted loss of each example.

  Args:
    logits: `[B, H, W, C]` float32; C = 1 is binary.
    masks: `[B, H, W]` int class ids.
    weights: term weights.

  Returns:
    `[B]` float32.
  """
  if logits.shape[-1] == 1:
    targets = masks.astype(jnp.float32)[..., None]
    cross_entropy = optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=(1, 2, 3))
    dice = optax.losses.binary_dice_loss(logits, targets) if weights.dice else 0.0
  else:
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, masks).mean(axis=(1, 2))
    one_hot = jax.nn.one_hot(masks, logits.shape[-1], dtype=jnp.float32)
    dice = optax.losses.dice_loss(logits, one_hot) if weights.dice else 0.0
  return weights.cross_entropy * cross_entropy + weights.dice * dice


def segmentation_loss(logits: jax.Array, masks: jax.Array, valid: jax.Array, weights: LossWeights) -> jax.Array:
  """Mean of `per_example_loss` over the valid examples (`valid` `[B]` in {0, 1}); a scalar."""
  losses = per_example_loss(logits, masks, weights)
  return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)
