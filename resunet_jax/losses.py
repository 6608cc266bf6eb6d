"""Segmentation losses: cross-entropy and soft Dice (optax's), focal, Tversky and clDice, weighted, over valid examples.

A model with one output channel is binary (sigmoid, masks in {0, 1}); with K > 1 channels it
is a K-class softmax over integer masks. A deeply supervised model's heads (a tuple of logits,
the main head first) add their losses with `deep_supervision_weights`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The loss terms and their settings (hashable: a static argument of the jitted step).

  Attributes:
    cross_entropy: weight of sigmoid BCE (1 output) or softmax cross-entropy (K outputs).
    dice: weight of the soft Dice loss (optax's, smooth 1, per image), or of the Tversky loss
      when `tversky` is not (0.5, 0.5).
    deep_supervision: one weight per head of a deeply supervised model, the main head first;
      empty means `deep_supervision_weights`' halving.
    focal: weight of the focal loss (Lin et al., ICCV 2017), mean over pixels.
    focal_gamma: its focusing exponent gamma.
    tversky: (alpha, beta), the weights of false positives and false negatives in the Dice
      term's denominator (Salehi et al., MLMI 2017); (0.5, 0.5) is Dice.
    cldice: weight of the soft clDice loss (Shit et al., CVPR 2021): Dice of each mask with the
      other's soft skeleton, for thin tubular structures (roads, vessels).
    cldice_iterations: soft-skeleton iterations, at least the largest structure radius in pixels.
  """

  cross_entropy: float = 1.0
  dice: float = 1.0
  deep_supervision: tuple[float, ...] = ()
  focal: float = 0.0
  focal_gamma: float = 2.0
  tversky: tuple[float, float] = (0.5, 0.5)
  cldice: float = 0.0
  cldice_iterations: int = 3

  @classmethod
  def from_config(cls, train) -> LossWeights:
    """The terms of a `config.train` section (`cross_entropy_weight`, `dice_weight`,
    `deep_supervision_weights`, `focal_weight`, `focal_gamma`, `tversky_alpha`, `tversky_beta`,
    `cldice_weight`, `cldice_iterations`; the ones after the first three may be absent).

    Raises:
      ValueError: a negative weight, alpha or beta, both zero, or fewer than 1 iteration.
    """
    heads = tuple(float(w) for w in train.get('deep_supervision_weights', ()) or ())
    weights = cls(
      float(train.cross_entropy_weight),
      float(train.dice_weight),
      heads,
      float(train.get('focal_weight', 0.0)),
      float(train.get('focal_gamma', 2.0)),
      (float(train.get('tversky_alpha', 0.5)), float(train.get('tversky_beta', 0.5))),
      float(train.get('cldice_weight', 0.0)),
      int(train.get('cldice_iterations', 3)),
    )
    for key in ('cross_entropy_weight', 'dice_weight', 'focal_weight', 'focal_gamma', 'cldice_weight'):
      if float(train.get(key, 0.0)) < 0:
        raise ValueError(f'train.{key}={float(train[key])} must be >= 0')
    if min(weights.tversky) < 0 or sum(weights.tversky) <= 0:
      raise ValueError(f'train.tversky_alpha, tversky_beta = {weights.tversky} must be >= 0 and not both 0')
    if weights.cldice_iterations < 1:
      raise ValueError(f'train.cldice_iterations={weights.cldice_iterations} must be at least 1')
    return weights

  @property
  def standard(self) -> bool:
    """Cross-entropy and Dice alone: the terms optax computes whole."""
    return not self.focal and not self.cldice and self.tversky == (0.5, 0.5)


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
  """The weighted loss of each example, of 2D images or 3D volumes.

  Args:
    logits: `[B, *spatial, C]` float32 (spatial: H, W or D, H, W); C = 1 is binary.
    masks: `[B, *spatial]` int class ids.
    weights: the terms.
    pixel_weights: None, or `[B, *spatial]` in {0, 1}: pixels of weight 0 (a patch's padding)
      are left out of every term (cross-entropy and focal averaged over the counted pixels,
      Dice and clDice over them alone; clDice's soft skeleton sees the padding as background).

  Returns:
    `[B]` float32.
  """
  if pixel_weights is not None or not weights.standard:
    return _weighted_loss(logits, masks, weights, pixel_weights)
  per_example = tuple(range(1, logits.ndim))  # spatial axes and channels
  if logits.shape[-1] == 1:
    targets = masks.astype(jnp.float32)[..., None]
    cross_entropy = optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=per_example)
    dice = optax.losses.binary_dice_loss(logits, targets) if weights.dice else 0.0
  else:
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, masks).mean(axis=per_example[:-1])
    one_hot = jax.nn.one_hot(masks, logits.shape[-1], dtype=jnp.float32)
    dice = optax.losses.dice_loss(logits, one_hot) if weights.dice else 0.0
  return weights.cross_entropy * cross_entropy + weights.dice * dice


def _weighted_loss(
  logits: jax.Array, masks: jax.Array, weights: LossWeights, pixel_weights: jax.Array | None
) -> jax.Array:
  """`per_example_loss` term by term, over the pixels of weight 1 (all without `pixel_weights`).

  The Dice term is optax's soft Dice (smooth 1, classes averaged) with Tversky's alpha and beta
  and the sums run over the counted pixels: optax takes no pixel mask, and its probability
  inputs (`apply_softmax=False`) are checked eagerly, which a jitted step cannot pass.
  """
  spatial = tuple(range(1, logits.ndim - 1))
  w = jnp.ones(masks.shape, jnp.float32) if pixel_weights is None else pixel_weights.astype(jnp.float32)
  w = w[..., None]
  counted = jnp.maximum(w.sum(axis=(*spatial, -1)), 1.0)
  if logits.shape[-1] == 1:
    targets = masks.astype(jnp.float32)[..., None]
    pixel_ce = optax.sigmoid_binary_cross_entropy(logits, targets)
    probabilities = jax.nn.sigmoid(logits)
    foreground = slice(None)
  else:
    pixel_ce = optax.softmax_cross_entropy_with_integer_labels(logits, masks)[..., None]
    targets = jax.nn.one_hot(masks, logits.shape[-1], dtype=jnp.float32)
    probabilities = jax.nn.softmax(logits, axis=-1)
    foreground = slice(1, None)
  loss = weights.cross_entropy * (pixel_ce * w).sum(axis=(*spatial, -1)) / counted
  if weights.focal:  # -(1 - p_t)**gamma log p_t, p_t the probability of the true class
    if logits.shape[-1] == 1:
      focal = optax.sigmoid_focal_loss(logits, targets, gamma=weights.focal_gamma)
    else:  # optax's is sigmoid only
      focal = (1.0 - jnp.exp(-pixel_ce)) ** weights.focal_gamma * pixel_ce
    loss += weights.focal * (focal * w).sum(axis=(*spatial, -1)) / counted
  if weights.dice:
    alpha, beta = weights.tversky
    both = (probabilities * targets * w).sum(axis=spatial)
    predicted, true = (probabilities * w).sum(axis=spatial), (targets * w).sum(axis=spatial)
    index = (both + 1.0) / (both + alpha * (predicted - both) + beta * (true - both) + 1.0)
    loss += weights.dice * (1.0 - index).mean(-1)
  if weights.cldice:
    prediction, truth = probabilities[..., foreground] * w, targets[..., foreground] * w
    loss += weights.cldice * cldice_loss(prediction, truth, weights.cldice_iterations)
  return loss


def _pool(x: jax.Array, reduce, window: tuple[int, ...]) -> jax.Array:
  """`reduce` ('max' | 'min') over a `window` around every pixel of `[B, *spatial, C]`, same size."""
  init, op = (-jnp.inf, jax.lax.max) if reduce == 'max' else (jnp.inf, jax.lax.min)
  full = (1, *window, 1)
  pads = [(0, 0), *((k // 2, k // 2) for k in window), (0, 0)]
  return jax.lax.reduce_window(x, init, op, full, (1,) * x.ndim, pads)


def soft_skeleton(x: jax.Array, iterations: int) -> jax.Array:
  """The soft skeleton of probabilities `[B, *spatial, C]` (Shit et al., CVPR 2021).

  Soft erosion is the minimum over each axis's 3-neighbourhood (the cross), soft dilation the
  maximum over the 3**n cube; the skeleton collects what each erosion's opening removes.
  """
  ndim = x.ndim - 2
  lines = [tuple(3 if a == axis else 1 for a in range(ndim)) for axis in range(ndim)]

  def erode(y):
    return functools.reduce(jnp.minimum, [_pool(y, 'min', line) for line in lines])

  def opening(y):
    return _pool(erode(y), 'max', (3,) * ndim)

  skeleton = jax.nn.relu(x - opening(x))
  for _ in range(iterations):
    x = erode(x)
    delta = jax.nn.relu(x - opening(x))
    skeleton = skeleton + jax.nn.relu(delta - skeleton * delta)
  return skeleton


def cldice_loss(prediction: jax.Array, truth: jax.Array, iterations: int, smooth: float = 1.0) -> jax.Array:
  """1 - clDice of foreground probabilities and masks `[B, *spatial, C]`, classes averaged: `[B]`.

  Topology precision is the share of the prediction's soft skeleton inside the true mask,
  topology sensitivity the share of the true skeleton inside the prediction; clDice is their
  harmonic mean (Shit et al., CVPR 2021, eq. 1-3).
  """
  spatial = tuple(range(1, prediction.ndim - 1))
  predicted_skeleton, true_skeleton = soft_skeleton(prediction, iterations), soft_skeleton(truth, iterations)
  precision = ((predicted_skeleton * truth).sum(spatial) + smooth) / (predicted_skeleton.sum(spatial) + smooth)
  sensitivity = ((true_skeleton * prediction).sum(spatial) + smooth) / (true_skeleton.sum(spatial) + smooth)
  return (1.0 - 2.0 * precision * sensitivity / (precision + sensitivity)).mean(-1)


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
