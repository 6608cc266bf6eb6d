"""Segmentation losses: cross-entropy and soft Dice (optax's), weighted, over valid examples.

A model with one output channel is binary (sigmoid, masks in {0, 1}); with K > 1 channels it
is a K-class softmax over integer masks. A deeply supervised model's heads (a tuple of logits,
the main head first) add their losses with `deep_supervision_weights`.
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
    deep_supervision: one weight per head of a deeply supervised model, the main head first;
      empty means `deep_supervision_weights`' halving.
  """

  cross_entropy: float = 1.0
  dice: float = 1.0
  deep_supervision: tuple[float, ...] = ()

  @classmethod
  def from_config(cls, train) -> LossWeights:
    """The weights of a `config.train` section (`cross_entropy_weight`, `dice_weight`,
    `deep_supervision_weights`)."""
    heads = tuple(float(w) for w in train.get('deep_supervision_weights', ()) or ())
    return cls(float(train.cross_entropy_weight), float(train.dice_weight), heads)


def deep_supervision_weights(heads: int, weights: tuple[float, ...] = ()) -> tuple[float, ...]:
  """The loss weight of each of `heads` outputs, the main head first, summing to 1.

  Empty `weights` gives nnU-Net's halving (Isensee et al. 2021, Nature Methods): 1, 1/2, 1/4, ..
  from the main head on, normalised. nnU-Net also zeroes its lowest-resolution output; we keep
  it, since at depth 2 that would leave the auxiliary head untrained. Given `weights` are
  normalised; their length must be `heads`.

  Raises:
    ValueError: a wrong number of weights, a negative one, or all zero.
  """
  if not weights:
    weights = tuple(0.5**k for k in range(heads))
  if len(weights) != heads:
    raise ValueError(
      f'train.deep_supervision_weights has {len(weights)} entries for a model with {heads} heads '
      '(main head first, then one per auxiliary head); give that many, or none for the halving'
    )
  if min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f'train.deep_supervision_weights={weights} must be non-negative and not all zero')
  return tuple(w / sum(weights) for w in weights)


def per_example_loss(
  logits: jax.Array, masks: jax.Array, weights: LossWeights, pixel_weights: jax.Array | None = None
) -> jax.Array:
  """The weighted loss of each example.

  Args:
    logits: `[B, H, W, C]` float32; C = 1 is binary.
    masks: `[B, H, W]` int class ids.
    weights: term weights.
    pixel_weights: None, or `[B, H, W]` in {0, 1}: pixels of weight 0 (a patch's padding) are left
      out of both terms (cross-entropy averaged over the counted pixels, Dice over them alone).

  Returns:
    `[B]` float32.
  """
  if pixel_weights is not None:
    return _masked_loss(logits, masks, weights, pixel_weights)
  if logits.shape[-1] == 1:
    targets = masks.astype(jnp.float32)[..., None]
    cross_entropy = optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=(1, 2, 3))
    dice = optax.losses.binary_dice_loss(logits, targets) if weights.dice else 0.0
  else:
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, masks).mean(axis=(1, 2))
    one_hot = jax.nn.one_hot(masks, logits.shape[-1], dtype=jnp.float32)
    dice = optax.losses.dice_loss(logits, one_hot) if weights.dice else 0.0
  return weights.cross_entropy * cross_entropy + weights.dice * dice


def _masked_loss(logits: jax.Array, masks: jax.Array, weights: LossWeights, pixel_weights: jax.Array) -> jax.Array:
  """`per_example_loss` over the pixels of weight 1 alone.

  The Dice term is optax's soft Dice (smooth 1, alpha = beta = 1/2, classes averaged) with the
  sums run over the counted pixels: optax takes no pixel mask, and its probability inputs
  (`apply_softmax=False`) are checked eagerly, which a jitted step cannot pass.
  """
  w = pixel_weights.astype(jnp.float32)[..., None]
  counted = jnp.maximum(w.sum(axis=(1, 2, 3)), 1.0)
  if logits.shape[-1] == 1:
    targets = masks.astype(jnp.float32)[..., None]
    cross_entropy = (optax.sigmoid_binary_cross_entropy(logits, targets) * w).sum(axis=(1, 2, 3)) / counted
    probabilities = jax.nn.sigmoid(logits)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, masks)[..., None]
    cross_entropy = (ce * w).sum(axis=(1, 2, 3)) / counted
    targets = jax.nn.one_hot(masks, logits.shape[-1], dtype=jnp.float32)
    probabilities = jax.nn.softmax(logits, axis=-1)
  if not weights.dice:
    return weights.cross_entropy * cross_entropy
  both = (probabilities * targets * w).sum(axis=(1, 2))
  predicted, true = (probabilities * w).sum(axis=(1, 2)), (targets * w).sum(axis=(1, 2))
  dice = 1.0 - (both + 1.0) / (both + 0.5 * (predicted - both) + 0.5 * (true - both) + 1.0)
  return weights.cross_entropy * cross_entropy + weights.dice * dice.mean(-1)


def segmentation_loss(
  logits: jax.Array | tuple[jax.Array, ...],
  masks: jax.Array,
  valid: jax.Array,
  weights: LossWeights,
  pixel_weights: jax.Array | None = None,
) -> jax.Array:
  """Mean of `per_example_loss` over the valid examples (`valid` `[B]` in {0, 1}); a scalar.

  `logits` may be a tuple of every head's logits (`UNet(all_heads=True)`, the main head first):
  their losses are summed with `deep_supervision_weights` (a 1-tuple is the main head alone).
  `pixel_weights` (`[B, H, W]`, 0 on a patch's padding) as in `per_example_loss`.
  """
  heads = logits if isinstance(logits, tuple) else (logits,)
  if len(heads) == 1:
    losses = per_example_loss(heads[0], masks, weights, pixel_weights)
  else:
    shares = deep_supervision_weights(len(heads), weights.deep_supervision)
    losses = sum(
      share * per_example_loss(head, masks, weights, pixel_weights) for share, head in zip(shares, heads, strict=True)
    )
  return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)
