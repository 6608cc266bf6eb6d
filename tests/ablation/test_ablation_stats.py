"""The statistics of a sweep against hand-computed values."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from resunet_jax.ablation import stats


def test_t_interval_of_three_values_by_hand():
  # mean 2, s = 1, n = 3: half width t_{0.975,2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138.
  interval = stats.t_interval([1.0, 2.0, 3.0])
  assert interval.n == 3 and interval.mean == 2.0
  assert interval.low == pytest.approx(2 - 2.484138, abs=1e-6)
  assert interval.high == pytest.approx(2 + 2.484138, abs=1e-6)
  assert interval.format() == '2.000 [-0.484, 4.484]'


def test_t_interval_matches_scipy_and_shrinks_with_more_seeds():
  values = [0.71, 0.74, 0.69, 0.75, 0.72]
  interval = stats.t_interval(values)
  low, high = scipy_stats.t.interval(0.95, 4, loc=np.mean(values), scale=scipy_stats.sem(values))
  assert (interval.low, interval.high) == pytest.approx((low, high))
  assert stats.t_interval(values[:3]).half_width > interval.half_width


def test_single_values_and_empty_lists_have_no_interval():
  one = stats.t_interval([0.5])
  assert one.mean == 0.5 and math.isnan(one.low) and one.format() == '0.500 (n=1)'
  assert stats.t_interval([]).n == 0


def test_paired_difference_pairs_by_seed():
  a = {0: 0.80, 1: 0.70, 2: 0.90, 3: 0.5}
  b = {0: 0.75, 1: 0.66, 2: 0.84}  # seed 3 has no partner and is left out
  interval = stats.paired_difference(a, b)
  assert interval.n == 3 and interval.mean == pytest.approx(0.05)
  # differences 0.05, 0.04, 0.06: s = 0.01, half width 4.302653 * 0.01 / sqrt(3) = 0.024841
  assert interval.half_width == pytest.approx(0.024841, abs=1e-6)
  assert interval.low > 0
  assert stats.paired_difference(b, a).high < 0


def test_steps_to_target_and_area_under_curve():
  curve = [(50, 0.2), (100, 0.45), (150, 0.6), (200, 0.55)]
  assert stats.steps_to_target(curve, 0.5) == 150
  assert stats.steps_to_target(curve, 0.7) is None
  # trapezoids from (0, 0): 50*0.1 + 50*0.325 + 50*0.525 + 50*0.575 = 76.25 over 200 steps
  assert stats.area_under_curve(curve, 200) == pytest.approx(76.25 / 200)


def test_gradient_share_normalises_by_parameter_count():
  counts = {'enc_0': 100, 'bottleneck': 400}
  # bottleneck RMS 2/20 = 0.1; network RMS 10/sqrt(500) = 0.4472: log10(0.1/0.4472) = -0.6505
  records = [{'grad_norm': 10.0, 'grad_norm/bottleneck': 2.0}, {'grad_norm': 10.0, 'grad_norm/bottleneck': 2.0}]
  assert stats.gradient_share(records, 'bottleneck', counts) == pytest.approx(math.log10(0.1 / (10 / math.sqrt(500))))


def test_sign_flip_p_counts_every_sign_assignment_by_hand():
  differences = [0.03, 0.01, -0.005, 0.02, 0.04, 0.015, -0.01, 0.025]
  means = [np.mean(np.multiply(signs, differences)) for signs in itertools.product((1, -1), repeat=8)]
  by_hand = np.mean([m >= np.mean(differences) - 1e-12 for m in means])  # 7 of 256 as large or larger
  assert stats.sign_flip_p(differences) == pytest.approx(by_hand)
  assert stats.sign_flip_p([0.01, 0.02, 0.03]) == pytest.approx(1 / 8)  # all positive: only the identity
  assert stats.sign_flip_p([-0.01, -0.02, -0.03]) == pytest.approx(1.0)
  # a bound shifts the null: differences of 0.03 +- 0.001 are not above 0.03
  assert stats.sign_flip_p([0.031, 0.029, 0.0305, 0.0295], bound=0.03) > 0.3
  assert stats.sign_flip_p([]) == 1.0
  assert (stats.sign_flip_p([0.02]), stats.sign_flip_p([-0.02])) == (0.5, 1.0)  # one seed: 2 assignments


def test_failure_test_is_the_hypergeometric_tail_by_hand():
  # 3 of 10 failed against 0 of 10: the two-sided p sums the tables as unlikely as this one,
  # P(k failures in arm a | 3 in all) = C(10, k) C(10, 3 - k) / C(20, 3)
  probability = [math.comb(10, k) * math.comb(10, 3 - k) / math.comb(20, 3) for k in range(4)]
  assert stats.failure_test(3, 10, 0, 10) == pytest.approx(probability[0] + probability[3])  # 0.2105
  assert stats.failure_test(2, 10, 2, 10) == pytest.approx(1.0)
  assert stats.failure_test(10, 10, 0, 10) < 1e-4
  with pytest.raises(ValueError, match='not a count'):
    stats.failure_test(11, 10, 0, 10)


def test_trend_p_is_pages_test_and_reads_the_order():
  rising = [[0.1, 0.2, 0.3, 0.4], [0.12, 0.18, 0.35, 0.33], [0.05, 0.22, 0.31, 0.45], [0.1, 0.15, 0.2, 0.5]]
  # Page's L = sum over conditions of (position * rank sum): 4 seeds of ranks 1..4 with one swap
  ranks = np.argsort(np.argsort(rising, axis=1), axis=1) + 1
  assert (ranks.sum(0) * np.arange(1, 5)).sum() == 119  # of the largest possible 120
  assert stats.trend_p(rising) < 0.01
  assert stats.trend_p(np.flip(rising, axis=1)) > 0.99  # the same gains in falling order
  with pytest.raises(ValueError, match='conditions >= 3'):
    stats.trend_p([[0.1, 0.2], [0.2, 0.3]])
