"""The loss terms besides cross-entropy and Dice: Tversky, focal and clDice, in 2D and 3D, masked and not."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resunet_jax import configs, losses


def _case(shape, classes, seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(*shape, classes)) * 2, jnp.float32)
  masks = jnp.asarray(rng.integers(0, max(classes, 2), size=shape), jnp.int32)
  return logits, masks


@pytest.mark.parametrize('classes', [1, 3])
@pytest.mark.parametrize('shape', [(2, 9, 7), (2, 5, 6, 4)])  # images and volumes
def test_the_term_by_term_path_equals_optax_for_cross_entropy_and_dice(shape, classes):
  logits, masks = _case(shape, classes)
  standard = losses.LossWeights(1.0, 1.0)
  # A zero-weight focal term sends the loss through the term-by-term path without changing it.
  term_by_term = losses.LossWeights(1.0, 1.0, focal=0.0, tversky=(0.5, 0.50000001))
  assert not term_by_term.standard
  np.testing.assert_allclose(
    losses.per_example_loss(logits, masks, term_by_term), losses.per_example_loss(logits, masks, standard), rtol=1e-5
  )


def _tversky_numpy(probabilities, targets, alpha, beta):
  axes = tuple(range(1, probabilities.ndim - 1))
  tp = (probabilities * targets).sum(axes)
  fp = (probabilities * (1 - targets)).sum(axes)
  fn = ((1 - probabilities) * targets).sum(axes)
  return (1 - (tp + 1) / (tp + alpha * fp + beta * fn + 1)).mean(-1)


@pytest.mark.parametrize('shape', [(2, 9, 7), (2, 5, 6, 4)])
def test_tversky_weights_false_positives_by_alpha_and_false_negatives_by_beta(shape):
  logits, masks = _case(shape, 3)
  probabilities = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  targets = np.eye(3)[np.asarray(masks)]
  terms = losses.LossWeights(0.0, 1.0, tversky=(0.7, 0.3))
  np.testing.assert_allclose(
    losses.per_example_loss(logits, masks, terms), _tversky_numpy(probabilities, targets, 0.7, 0.3), rtol=1e-5
  )
  # Predicting foreground everywhere: false positives only, which alpha alone charges.
  everywhere = jnp.full((1, 8, 8, 1), 20.0)
  half = jnp.zeros((1, 8, 8), jnp.int32).at[:, :4].set(1)
  by_alpha = [
    float(losses.per_example_loss(everywhere, half, losses.LossWeights(0, 1, tversky=(a, 0.5)))[0]) for a in (0.2, 0.8)
  ]
  by_beta = [
    float(losses.per_example_loss(everywhere, half, losses.LossWeights(0, 1, tversky=(0.5, b)))[0]) for b in (0.2, 0.8)
  ]
  assert by_alpha[0] < by_alpha[1]
  assert by_beta[0] == pytest.approx(by_beta[1], abs=1e-6)


def test_focal_is_optaxs_for_one_output_and_the_softmax_form_for_several():
  logits, masks = _case((2, 6, 5), 1)
  terms = losses.LossWeights(0.0, 0.0, focal=1.0, focal_gamma=2.0)
  expected = optax.sigmoid_focal_loss(logits, masks[..., None].astype(jnp.float32), gamma=2.0).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(losses.per_example_loss(logits, masks, terms), expected, rtol=1e-5)
  logits, masks = _case((2, 4, 3, 5), 4)  # volumes, four classes
  p = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  p_true = np.take_along_axis(p, np.asarray(masks)[..., None], -1)[..., 0]
  expected = (-((1 - p_true) ** 1.5) * np.log(p_true)).mean(axis=(1, 2, 3))
  got = losses.per_example_loss(logits, masks, losses.LossWeights(0.0, 0.0, focal=1.0, focal_gamma=1.5))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # gamma 0 is cross-entropy
  np.testing.assert_allclose(
    losses.per_example_loss(logits, masks, losses.LossWeights(0.0, 0.0, focal=1.0, focal_gamma=0.0)),
    losses.per_example_loss(logits, masks, losses.LossWeights(1.0, 0.0)),
    rtol=1e-5,
  )


def _road(shape=(1, 24, 24)):
  mask = np.zeros(shape, np.int32)
  mask[:, 10:14, 2:22] = 1  # a horizontal road 4 px wide
  return mask


def _as_logits(mask):
  return jnp.asarray(np.where(mask, 12.0, -12.0)[..., None], jnp.float32)


def test_the_soft_skeleton_of_a_road_is_its_centre_line():
  skeleton = np.asarray(losses.soft_skeleton(jnp.asarray(_road(), jnp.float32)[..., None], 3))[0, ..., 0]
  rows = np.flatnonzero(skeleton.sum(1) > 0.5)
  assert set(rows) <= {11, 12}  # the two middle rows of rows 10-13
  assert (skeleton[11:13, 4:20].max(0) > 0.9).all()  # unbroken along the road


def test_cldice_charges_a_broken_road_more_than_a_thicker_one_which_dice_charges_more():
  truth = _road()
  broken = truth.copy()
  broken[:, :, 11:13] = 0  # a 2 px gap: topology lost, 8 pixels wrong
  thick = truth.copy()
  thick[:, 8:10, 2:22] = 1  # 40 pixels wrong, topology kept
  cldice = losses.LossWeights(0.0, 0.0, cldice=1.0, cldice_iterations=3)
  dice = losses.LossWeights(0.0, 1.0)

  def loss(terms, prediction):
    return float(losses.per_example_loss(_as_logits(prediction), jnp.asarray(truth), terms)[0])

  assert loss(cldice, truth) == pytest.approx(0.0, abs=1e-4)
  assert loss(cldice, broken) > loss(cldice, thick)
  assert loss(dice, broken) < loss(dice, thick)


@pytest.mark.parametrize('shape', [(2, 10, 9), (1, 7, 8, 6)])
def test_every_term_leaves_the_padding_out(shape):
  logits, masks = _case(shape, 1, seed=3)
  terms = losses.LossWeights(1.0, 1.0, focal=0.5, tversky=(0.6, 0.4))
  crop = (slice(None), *(slice(0, n - 2) for n in shape[1:]))
  weight = np.zeros(shape, np.float32)
  weight[crop] = 1
  alone = losses.per_example_loss(logits[crop], masks[crop], terms)
  padded = losses.per_example_loss(logits, masks, terms, jnp.asarray(weight))
  np.testing.assert_allclose(padded, alone, rtol=1e-5)
  with_cldice = dataclasses.replace(terms, cldice=0.5)
  grad = jax.grad(lambda x: losses.per_example_loss(x, masks, with_cldice, jnp.asarray(weight)).sum())(logits)
  assert np.isfinite(np.asarray(grad)).all()
  assert not np.asarray(grad)[(slice(None), *(slice(n - 2, None) for n in shape[1:]))].any()


def test_cldice_of_a_road_away_from_the_border_ignores_the_padding():
  # Padding counts as background to the soft skeleton (the image border, unpadded, erodes nothing),
  # so the two agree where no structure touches the border.
  truth = _road()
  prediction = truth.copy()
  prediction[:, :, 11:13] = 0
  terms = losses.LossWeights(0.0, 0.0, cldice=1.0)
  weight = np.zeros((1, 30, 30), np.float32)
  weight[:, :24, :24] = 1
  padded_truth, padded_prediction = (
    np.pad(truth, [(0, 0), (0, 6), (0, 6)]),
    np.pad(prediction, [(0, 0), (0, 6), (0, 6)]),
  )
  alone = losses.per_example_loss(_as_logits(prediction), jnp.asarray(truth), terms)
  padded = losses.per_example_loss(_as_logits(padded_prediction), jnp.asarray(padded_truth), terms, jnp.asarray(weight))
  np.testing.assert_allclose(padded, alone, rtol=1e-5)


def test_the_terms_come_from_the_train_section_and_bad_values_are_refused():
  train = configs.base_config().train
  assert losses.LossWeights.from_config(train) == losses.LossWeights()
  train.focal_weight, train.tversky_alpha, train.tversky_beta, train.cldice_weight = 1.0, 0.3, 0.7, 0.2
  terms = losses.LossWeights.from_config(train)
  assert (terms.focal, terms.tversky, terms.cldice) == (1.0, (0.3, 0.7), 0.2)
  for key, value, message in [
    ('focal_weight', -1.0, 'focal_weight=-1.0 must be >= 0'),
    ('tversky_alpha', -0.1, 'tversky_alpha'),
    ('cldice_iterations', 0, 'cldice_iterations=0 must be at least 1'),
  ]:
    bad = configs.base_config().train
    bad[key] = value
    with pytest.raises(ValueError, match=message):
      losses.LossWeights.from_config(bad)
