"""The statistics of a sweep: t-intervals over seeds, paired differences, convergence, gradient flow.

Seeds are the unit of replication: every arm is trained once per seed, and the seed fixes the
data order and augmentation (the initialisation differs between arms whose parameter trees
differ). An arm's mean and its 95% confidence interval are Student's t-interval over its
seeds' scores; a comparison of two arms is the t-interval of their per-seed differences,
paired by seed (Student 1908; e.g. Dror et al., ACL 2018, on significance in deep learning).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean and its two-sided confidence interval; `low`/`high` are NaN for a single value.

  Attributes:
    mean: the sample mean.
    low: lower end of the interval.
    high: upper end.
    n: number of values.
  """

  mean: float
  low: float
  high: float
  n: int

  @property
  def half_width(self) -> float:
    return (self.high - self.low) / 2

  def format(self, digits: int = 3) -> str:
    """'0.812 [0.790, 0.834]', or '0.812 (n=1)' without an interval."""
    if self.n < 2:
      return f'{self.mean:.{digits}f} (n={self.n})'
    return f'{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]'


def t_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
  """Student's t confidence interval of the mean of `values`.

  `mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)`, with `s` the sample standard deviation
  (ddof 1). For 3 values the multiplier is t_{0.975, 2} = 4.303.
  """
  values = np.asarray(list(values), np.float64)
  n = len(values)
  if n == 0:
    return Interval(float('nan'), float('nan'), float('nan'), 0)
  mean = float(values.mean())
  if n < 2:
    return Interval(mean, float('nan'), float('nan'), n)
  half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
  return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Interval:
  """The t-interval of `a[seed] - b[seed]` over the seeds both have."""
  seeds = sorted(set(a) & set(b))
  return t_interval([a[s] - b[s] for s in seeds], confidence)


def steps_to_target(curve: Sequence[tuple[int, float]], target: float) -> int | None:
  """The first evaluated step whose value reaches `target`, or None if none does.

  Args:
    curve: `(step, validation Dice)` pairs in step order.
  """
  for step, value in curve:
    if value >= target:
      return int(step)
  return None


def area_under_curve(curve: Sequence[tuple[int, float]], num_steps: int) -> float:
  """Mean validation Dice over training, the trapezoid rule from step 0 (Dice 0) to `num_steps`.

  A convergence measure without a threshold: 1 is perfect from the start.
  """
  steps = np.asarray([0] + [s for s, _ in curve], np.float64)
  values = np.asarray([0.0] + [v for _, v in curve], np.float64)
  return float(np.sum((steps[1:] - steps[:-1]) * (values[1:] + values[:-1]) / 2) / max(num_steps, 1))


def gradient_rms(record: Mapping[str, float], block: str, param_counts: Mapping[str, int]) -> float:
  """Per-parameter gradient RMS of `block` in one logged record: its norm over sqrt(its size).

  Makes blocks of different sizes comparable.
  """
  return record[f'grad_norm/{block}'] / math.sqrt(param_counts[block])


def gradient_share(records: Sequence[Mapping[str, float]], block: str, param_counts: Mapping[str, int]) -> float:
  """Mean over logged steps of log10(per-parameter gradient RMS of `block` / that of the network).

  Per-parameter RMS (`norm / sqrt(count)`) makes blocks of different sizes comparable; a
  vanishing gradient shows as a strongly negative value for the deepest block.

  Args:
    records: training metrics with `grad_norm` and `grad_norm/<block>`.
    block: the block's name, e.g. 'bottleneck'.
    param_counts: parameters per top-level module.
  """
  total = sum(param_counts.values())
  ratios = []
  for record in records:
    block_rms = gradient_rms(record, block, param_counts)
    total_rms = record['grad_norm'] / math.sqrt(total)
    if block_rms > 0 and total_rms > 0:
      ratios.append(math.log10(block_rms / total_rms))
  return float(np.mean(ratios)) if ratios else float('nan')


def sign_flip_p(differences: Sequence[float], bound: float = 0.0) -> float:
  """One-sided p of H1 `mean(differences) > bound`: the exact sign-flip permutation test.

  Under H0 each paired difference (less `bound`) is as likely positive as negative, so every
  one of the `2**n` sign assignments is equally likely (Fisher 1935; Good, *Permutation Tests*,
  2005): p is the share of them whose mean is at least the observed one. Beside the t-test it
  needs no normality, which matters when failed and trained runs mix (bimodal differences).
  1.0 for no differences; beyond 16 seeds, 65,536 random assignments (seeded).
  """
  values = np.asarray(differences, np.float64) - bound
  if len(values) < 2:  # none: no test; one: its 2 assignments (scipy needs two)
    return 0.5 if len(values) and values[0] > 0 else 1.0
  result = scipy_stats.permutation_test(
    (values,),
    lambda x, axis: np.mean(x, axis=axis),
    permutation_type='samples',
    alternative='greater',
    n_resamples=np.inf if len(values) <= 16 else 2**16,
    random_state=0,
  )
  return float(result.pvalue)


def failure_test(failed_a: int, runs_a: int, failed_b: int, runs_b: int) -> float:
  """Two-sided p of Fisher's exact test that two arms fail at the same rate (Fisher 1922).

  A failed run (the constant prediction) is a count, not a Dice value to average; the test
  conditions on the total number of failures, so it is exact for 10 seeds an arm.
  """
  for failed, runs in ((failed_a, runs_a), (failed_b, runs_b)):
    if not 0 <= failed <= runs:
      raise ValueError(f'{failed} failures out of {runs} runs is not a count')
  table = [[failed_a, runs_a - failed_a], [failed_b, runs_b - failed_b]]
  return float(scipy_stats.fisher_exact(table).pvalue)


def trend_p(scores: Sequence[Sequence[float]]) -> float:
  """One-sided p of Page's test (Page 1963) for a rising trend over ordered conditions.

  Args:
    scores: `[seeds, conditions]`, each row one seed's value at every condition in the
      pre-registered order (e.g. the residual gain at depths 2, 3, 4, 5). The test ranks within
      each seed, so it asks whether the order holds, not whether the rise is linear.
  """
  table = np.asarray(scores, np.float64)
  if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 3:
    raise ValueError(f'a trend test needs [seeds >= 2, conditions >= 3] scores; got shape {table.shape}')
  return float(scipy_stats.page_trend_test(table).pvalue)
