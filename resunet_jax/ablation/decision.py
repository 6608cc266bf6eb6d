"""The one verdict rule of every ablation report: paired t-tests, TOST equivalence and Holm, four words.

Each claim of the design note, on each dataset, is one `Endpoint`: an effect estimate signed
so that the claim predicts a positive value, its standard error and degrees of freedom (for
per-seed paired differences, `Endpoint.paired`: their mean, s / sqrt(n), n - 1; for a
regression coefficient, its OLS estimate and standard error), and an equivalence margin
`delta`, the smallest effect the study cares about. Three kinds of one-sided t-test are run:

  claim        H0: effect <= 0          (the effect goes the claimed way)
  opposite     H0: effect >= 0          (the effect goes the other way)
  equivalence  H0: |effect| >= delta    (two one-sided tests, TOST: Schuirmann 1987; Lakens 2017)

Each kind of test is Holm-corrected (Holm 1979) over every endpoint of the family, and the
verdict is, in this order of precedence:

  'equivalent within +-delta'  the adjusted TOST p is below alpha: whatever its sign, the
                               effect is smaller than delta, the smallest effect of interest
  'supported'                  the adjusted claim p is below alpha
  'not supported'              the adjusted opposite p is below alpha
  'inconclusive'               none of them, or the endpoint was declared invalid before the
                               test (`Endpoint.invalid`: a pre-registered validity check failed)

Nothing else changes a verdict: every report prints what `decide` returns. A study chooses in
its protocol which test decides (`decide(..., test=)`): the t-tests, or the same three as exact
sign-flip tests of the per-seed differences (`stats.sign_flip_p`); the other one's Holm-adjusted
claim p rides along as `Decision.p_claim_other`, a check that does not decide.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

from resunet_jax.ablation import stats

SUPPORTED = 'supported'
NOT_SUPPORTED = 'not supported'
EQUIVALENT = 'equivalent within +-delta'
INCONCLUSIVE = 'inconclusive'
VERDICTS = (SUPPORTED, NOT_SUPPORTED, EQUIVALENT, INCONCLUSIVE)
TESTS = ('t', 'sign_flip')
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """One pre-registered comparison.

  Attributes:
    name: e.g. 'claim 1 / roads'.
    estimate: the effect, signed so that the claim predicts > 0.
    se: its standard error (0: known exactly, e.g. identical seeds).
    df: degrees of freedom of its t distribution; 0 means no test is possible (one seed).
    delta: the equivalence margin (> 0), in the units of `estimate`.
    invalid: why a pre-registered validity check rules the test out ('' when it holds): the
      verdict is then 'inconclusive', and the endpoint still counts in its Holm family.
    differences: the per-seed paired differences (`paired`), for the sign-flip test beside the
      t-test; empty for other estimates.
  """

  name: str
  estimate: float
  se: float
  df: int
  delta: float
  invalid: str = ''
  differences: tuple[float, ...] = ()

  @classmethod
  def paired(cls, name: str, differences: Sequence[float], delta: float) -> Endpoint:
    """From per-seed paired differences: a one-sample t-test of their mean."""
    values = np.asarray(differences, np.float64)
    n = len(values)
    if n == 0:
      return cls(name, float('nan'), float('nan'), 0, delta)
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan')
    return cls(name, float(values.mean()), se, n - 1, delta, differences=tuple(values.tolist()))

  def interval(self, confidence: float = 0.95) -> stats.Interval:
    """The estimate and its t-interval."""
    if self.df < 1:
      return stats.Interval(self.estimate, float('nan'), float('nan'), self.df + 1)
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, self.df)) * self.se
    return stats.Interval(self.estimate, self.estimate - half, self.estimate + half, self.df + 1)

  def p_above(self, bound: float, test: str = 't') -> float:
    """One-sided p of H1 `effect > bound` (1 where no test is possible), by the t-test or the
    exact sign-flip test of the per-seed differences (`test='sign_flip'`, `stats.sign_flip_p`)."""
    if test == 'sign_flip':
      return stats.sign_flip_p(self.differences, bound)
    return self._p(self.estimate - bound)

  def p_below(self, bound: float, test: str = 't') -> float:
    """One-sided p of H1 `effect < bound`."""
    if test == 'sign_flip':
      return stats.sign_flip_p([-d for d in self.differences], -bound)
    return self._p(bound - self.estimate)

  def _p(self, margin: float) -> float:
    if self.df < 1 or not math.isfinite(margin):
      return 1.0
    if self.se == 0:  # no spread: the t statistic is infinite in the margin's direction
      return 0.0 if margin > 0 else 1.0
    return float(scipy_stats.t.sf(margin / self.se, self.df))


@dataclasses.dataclass(frozen=True)
class Decision:
  """The verdict of one endpoint with the numbers it rests on.

  Attributes:
    endpoint: what was tested.
    verdict: one of `VERDICTS` (`EQUIVALENT` with delta written out: see `label`).
    p_claim, p_opposite, p_equivalence: Holm-adjusted one-sided p-values of the deciding `test`.
    test: 't' or 'sign_flip', the test that decided (`decide`).
    p_claim_other: the claim's Holm-adjusted p under the other test, printed beside as a check
      (the sign-flip test needs no normality; the t-test is the familiar one); NaN where the other
      test is not possible (a sign flip without per-seed differences). It does not change the verdict.
  """

  endpoint: Endpoint
  verdict: str
  p_claim: float
  p_opposite: float
  p_equivalence: float
  test: str = 't'
  p_claim_other: float = float('nan')

  @property
  def effect(self) -> stats.Interval:
    """The effect and its 95% interval."""
    return self.endpoint.interval()

  @property
  def label(self) -> str:
    """The verdict as the report prints it: 'equivalent within +-0.02' names its margin."""
    return f'equivalent within +-{self.endpoint.delta:g}' if self.verdict == EQUIVALENT else self.verdict


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values (family-wise error rate), in the input order."""
  p = np.asarray(p_values, np.float64)
  m = len(p)
  order = np.argsort(p, kind='stable')
  adjusted = np.empty(m)
  running = 0.0
  for rank, index in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[index]))
    adjusted[index] = running
  return adjusted.tolist()


def decide(endpoints: Sequence[Endpoint], alpha: float = ALPHA, test: str = 't') -> list[Decision]:
  """The verdict of every endpoint of one family (claims x datasets), Holm-corrected together.

  Args:
    test: 't' (the t-tests of the module docstring) or 'sign_flip' (the same three one-sided
      tests as exact sign-flip tests of the per-seed differences, which every endpoint must then
      have: a study whose differences may be bimodal, e.g. failed runs beside trained ones).
  """
  if test not in TESTS:
    raise ValueError(f'test={test!r} is not one of {TESTS}')
  for endpoint in endpoints:
    if not endpoint.delta > 0:
      raise ValueError(f'{endpoint.name}: the equivalence margin delta={endpoint.delta!r} must be > 0')
    if test == 'sign_flip' and not endpoint.differences:
      raise ValueError(f'{endpoint.name}: the sign-flip test needs per-seed differences (Endpoint.paired)')
  claim = holm([e.p_above(0.0, test) for e in endpoints])
  opposite = holm([e.p_below(0.0, test) for e in endpoints])
  equivalence = holm([max(e.p_above(-e.delta, test), e.p_below(e.delta, test)) for e in endpoints])
  other = TESTS[1 - TESTS.index(test)]
  possible = [e for e in endpoints if other == 't' or e.differences]
  other_p = dict(zip(map(id, possible), holm([e.p_above(0.0, other) for e in possible]), strict=True))
  decisions = []
  for endpoint, p_claim, p_opposite, p_equivalence in zip(endpoints, claim, opposite, equivalence, strict=True):
    if endpoint.invalid:
      verdict = INCONCLUSIVE
    elif p_equivalence < alpha:
      verdict = EQUIVALENT
    elif p_claim < alpha:
      verdict = SUPPORTED
    elif p_opposite < alpha:
      verdict = NOT_SUPPORTED
    else:
      verdict = INCONCLUSIVE
    check = other_p.get(id(endpoint), float('nan'))
    decisions.append(Decision(endpoint, verdict, p_claim, p_opposite, p_equivalence, test, check))
  return decisions


def power(effect: float, sd: float, n: int, alpha: float) -> float:
  """Power of the one-sided paired t-test at level `alpha` with `n` seeds for a true mean `effect`."""
  if n < 2 or sd <= 0:
    raise ValueError(f'power needs n >= 2 seeds and sd > 0; got n={n}, sd={sd}')
  critical = scipy_stats.t.ppf(1 - alpha, n - 1)
  return float(scipy_stats.nct.sf(critical, n - 1, effect / sd * math.sqrt(n)))


def detectable_effect(sd: float, n: int, alpha: float, target_power: float = 0.8) -> float:
  """The smallest true mean difference the one-sided paired t-test detects with `target_power`.

  Args:
    sd: standard deviation of the per-seed differences (from a pilot).
    n: seeds.
    alpha: the test's level (for a Holm family of m tests, the worst case is alpha / m).
    target_power: e.g. 0.8.
  """
  return float(optimize.brentq(lambda e: power(e, sd, n, alpha) - target_power, 1e-9 * sd, 100 * sd))
