"""The protocol's decision rule on synthetic results: each of the four verdicts, Holm, precedence, power."""

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from resunet_jax.ablation import decision, report


def _seeds(mean, sd, n=10, seed=0):
  """n values with exactly this sample mean and standard deviation."""
  z = np.random.default_rng(seed).standard_normal(n)
  return list(mean + sd * (z - z.mean()) / z.std(ddof=1))


@pytest.mark.parametrize(
  ('differences', 'delta', 'verdict'),
  [
    (_seeds(0.08, 0.02), 0.02, decision.SUPPORTED),  # well above 0, well outside the margin
    (_seeds(-0.08, 0.02), 0.02, decision.NOT_SUPPORTED),
    (_seeds(0.001, 0.005), 0.02, decision.EQUIVALENT),  # the 90% interval inside +-0.02
    (_seeds(0.01, 0.05), 0.02, decision.INCONCLUSIVE),  # noise: neither side nor inside the margin
    (_seeds(0.01, 0.002), 0.02, decision.EQUIVALENT),  # above 0 for sure, but smaller than delta
    ([0.05], 0.02, decision.INCONCLUSIVE),  # one seed: no test
    ([0.03, 0.03, 0.03], 0.02, decision.SUPPORTED),  # no spread: every seed on the claimed side
  ],
)
def test_each_outcome_gets_its_verdict(differences, delta, verdict):
  (result,) = decision.decide([decision.Endpoint.paired('claim', differences, delta)])
  assert result.verdict == verdict
  assert result.effect.mean == pytest.approx(np.mean(differences))
  assert (result.label == 'equivalent within +-0.02') == (verdict == decision.EQUIVALENT)


def test_the_p_values_are_scipys_one_sided_tests():
  values = _seeds(0.02, 0.03, n=6)
  (result,) = decision.decide([decision.Endpoint.paired('x', values, 0.05)])
  assert result.p_claim == pytest.approx(scipy_stats.ttest_1samp(values, 0.0, alternative='greater').pvalue)
  assert result.p_opposite == pytest.approx(scipy_stats.ttest_1samp(values, 0.0, alternative='less').pvalue)
  tost = max(
    scipy_stats.ttest_1samp(values, -0.05, alternative='greater').pvalue,
    scipy_stats.ttest_1samp(values, 0.05, alternative='less').pvalue,
  )
  assert result.p_equivalence == pytest.approx(tost)


def test_holm_by_hand_and_a_verdict_it_takes_away():
  # sorted 0.01, 0.02, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04); input order kept.
  assert decision.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
  assert decision.holm([0.3, 0.01]) == pytest.approx([0.3, 0.02])
  assert decision.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # monotone: never below an earlier step
  borderline = _seeds(0.03, 0.05, n=10, seed=1)  # alone p ~ 0.04
  alone = decision.Endpoint.paired('b', borderline, 0.001).p_above(0.0)
  assert 0.01 < alone < 0.05
  assert decision.decide([decision.Endpoint.paired('b', borderline, 0.001)])[0].verdict == decision.SUPPORTED
  family = [decision.Endpoint.paired('b', borderline, 0.001)] + [
    decision.Endpoint.paired(f'noise {i}', _seeds(0.0, 0.05, seed=10 + i), 0.001) for i in range(5)
  ]
  first = decision.decide(family)[0]
  assert first.p_claim == pytest.approx(6 * alone)
  assert first.verdict == decision.INCONCLUSIVE


def test_a_regression_coefficient_is_tested_like_a_mean():
  # A slope of 0.01 per level with standard error 0.003 on 28 degrees of freedom.
  slope = decision.Endpoint('claim 4 / roads', 0.01, 0.003, 28, 0.005)
  (result,) = decision.decide([slope])
  assert result.p_claim == pytest.approx(scipy_stats.t.sf(0.01 / 0.003, 28))
  assert result.verdict == decision.SUPPORTED
  half = scipy_stats.t.ppf(0.975, 28) * 0.003
  assert (result.effect.low, result.effect.high) == pytest.approx((0.01 - half, 0.01 + half))


def test_a_margin_must_be_positive():
  with pytest.raises(ValueError, match=r'claim 3 / roads: the equivalence margin delta=0 must be > 0'):
    decision.decide([decision.Endpoint.paired('claim 3 / roads', [0.1, 0.2], 0)])


def test_detectable_effect_at_80_percent_power():
  # One-sided, alpha 0.05, 10 seeds: between the normal approximation (z_0.95 + z_0.8) / sqrt(10)
  # = 0.786 sd and the t-test's larger figure; at that effect the power is 0.8.
  effect = decision.detectable_effect(sd=1.0, n=10, alpha=0.05)
  assert 0.786 < effect < 0.9
  assert decision.power(effect, 1.0, 10, 0.05) == pytest.approx(0.8, abs=1e-6)
  assert decision.detectable_effect(0.02, 10, 0.05 / 6) > decision.detectable_effect(0.02, 10, 0.05)
  assert decision.detectable_effect(0.02, 20, 0.05) < decision.detectable_effect(0.02, 10, 0.05)


def test_the_sign_flip_test_decides_where_asked_and_checks_the_t_test_beside():
  strong, weak = [0.03, 0.01, 0.02, 0.04, 0.015, 0.025], [0.03, -0.01, 0.02, 0.04, -0.015, 0.025]
  endpoints = [decision.Endpoint.paired('strong', strong, 0.005), decision.Endpoint.paired('weak', weak, 0.005)]
  by_t = decision.decide(endpoints)
  first, second = decision.decide(endpoints, test='sign_flip')
  # by hand: 1 of 64 sign assignments reach the strong mean, 6 of 64 the weak one's (0.015); Holm
  assert (first.p_claim, second.p_claim) == pytest.approx((2 / 64, 6 / 64))
  assert (first.test, first.p_claim_other) == ('sign_flip', by_t[0].p_claim)  # the t-test beside
  assert (by_t[0].p_claim_other, by_t[1].p_claim_other) == pytest.approx((2 / 64, 6 / 64))
  assert by_t[0].p_claim < 0.01 < first.p_claim  # 6 seeds: the exact test cannot go below 1/64
  assert second.p_opposite == pytest.approx(1.0)  # a mean of 0.015 is never below 0 more than half of the time

  # equivalence within 0.005 by hand (one endpoint: no Holm): the larger of the sign-flip p of
  # mean > -0.005 (the differences shifted by +0.005) and of mean < 0.005 (0.005 minus them)
  def share(values):
    flipped = [np.mean(np.multiply(signs, values)) for signs in itertools.product((1, -1), repeat=len(values))]
    return np.mean([m >= np.mean(values) - 1e-12 for m in flipped])

  (alone,) = decision.decide([decision.Endpoint.paired('weak', weak, 0.005)], test='sign_flip')
  tost = max(share(np.add(weak, 0.005)), share(np.subtract(0.005, weak)))
  assert alone.p_equivalence == pytest.approx(tost) and tost > 0.5
  slope = decision.Endpoint('slope', 0.05, 0.01, 8, 0.01)  # a coefficient: no differences to flip
  assert np.isnan(decision.decide([*endpoints, slope])[2].p_claim_other)
  with pytest.raises(ValueError, match='needs per-seed differences'):
    decision.decide([slope], test='sign_flip')
  header, _, row, *_ = report.decision_table([first, second], check=True)
  assert header.split(' | ')[2:4] == ['p claim (sign flip)', 'p claim (t)']
  assert row.split(' | ')[2:4] == [f'{2 / 64:.3g}', f'{by_t[0].p_claim:.3g}']
