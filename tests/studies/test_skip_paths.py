"""The skip-path study (studies/skip_paths): its seven endpoints follow the one verdict rule, and
its committed report is what its committed results.csv gives, checked against scipy too."""

import csv
import pathlib

import numpy as np
import pytest
from scipy import stats as scipy_stats

from resunet_jax import ablation
from resunet_jax.ablation import decision, report
from studies.skip_paths import endpoints
from tests.ablation.test_ablation_report import _result

RESULTS = pathlib.Path(__file__).resolve().parents[2] / 'studies' / 'skip_paths' / 'results'


def _skip_path_arms(effects, seeds=5):
  """The six skip-path arms, whose test Dice is `base + effects[(residual, variant)] + noise`."""
  arms = []
  for (residual, variant), effect in effects.items():
    results = {}
    for seed in range(seeds):
      noise = 0.002 * ((seed * 7 + len(variant) + residual) % 5)  # differs per arm: a spread in every difference
      result = _result(residual, seed, dice=0.5, boundary_f1=0.5, curve=[(50, 0.5)], bottleneck_grad=0.1)
      result.test['dice'] = 0.5 + effect + noise
      results[seed] = result
    name = f'{"residual" if residual else "plain"}-all' + (f'-{variant}' if variant else '')
    arms.append(report.Arm('roads', name, residual, '11', 2, results, variant or 'concat'))
  return arms


def _decide(arms):
  return endpoints.decisions(endpoints.test_dice(arms))


def test_skip_path_verdicts_follow_the_protocol_rule():
  """Attention helps by 0.1 (supported), nested hurts by 0.1 (not supported), the residual
  switch changes nothing (equivalent within 0.02); Holm over the 7 endpoints."""
  effects = {
    (False, ''): 0.0,
    (True, ''): 0.0,
    (False, 'attention'): 0.1,
    (True, 'attention'): 0.1,
    (False, 'nested'): -0.1,
    (True, 'nested'): -0.1,
  }
  decisions = _decide(_skip_path_arms(effects))
  verdicts = {d.endpoint.name.split(':')[0]: d.label for d in decisions}
  assert verdicts == {
    'A1': 'supported',
    'A2': 'supported',
    'N1': 'not supported',
    'N2': 'not supported',
    'R1': 'equivalent within +-0.02',
    'R2': 'equivalent within +-0.02',
    'R3': 'equivalent within +-0.02',
  }
  a1 = next(d for d in decisions if d.endpoint.name.startswith('A1'))
  assert a1.effect.mean == pytest.approx(0.1, abs=0.01) and a1.endpoint.df == 4
  section = '\n'.join(endpoints.section({'roads': _skip_path_arms(effects)}))
  assert '**not supported**' in section and 'Holm-adjusted over the 7 endpoints' in section
  missing_seed = _skip_path_arms(effects)
  del missing_seed[3].results[4]
  assert _decide(missing_seed) == []  # no verdicts before every arm has every seed
  assert _decide([a for a in _skip_path_arms(effects) if not a.variant]) == []


def test_the_studys_verdicts_replace_the_sweeps_claims_in_its_report():
  """Only the pre-registered endpoints carry verdict words in the study's report."""
  from experiments import claims

  effects = {(r, v): 0.0 for r in (False, True) for v in ('', 'attention', 'nested')}
  arms = _skip_path_arms(effects)
  pairs = [
    (ablation.RunSpec('roads', arm.name, seed, arm.residual, '11', 2, None, arm.skip_kind), result)
    for arm in arms
    for seed, result in arm.results.items()
  ]
  verdicts = endpoints.section(report.group(pairs))
  text = report.markdown(pairs, target=0.5, command='c', figures=[], verdicts=verdicts)
  assert '## Skip paths in study `roads`' in text and "Verdicts on the design note's claims" not in text
  grid = report.markdown(pairs, target=0.5, command='c', figures=[], verdicts=claims.section(report.group(pairs), 0.5))
  assert "Verdicts on the design note's claims" in grid  # the exploratory grid's section instead


def _committed_dice():
  """(residual, variant) -> {seed: test Dice} from the committed results.csv."""
  dice: dict = {}
  with (RESULTS / 'results.csv').open() as f:
    for row in csv.DictReader(f):
      variant = row['arm'].removeprefix('plain-all').removeprefix('residual-all').removeprefix('-')
      dice.setdefault((row['residual'] == '1', variant), {})[int(row['seed'])] = float(row['dice'])
  return dice


def test_the_committed_verdict_section_is_what_the_committed_table_gives_both_ways():
  """The section recomputed from results.csv is the report's, line for line: no line missing, none extra."""
  decided = endpoints.decisions(_committed_dice())
  assert len(decided) == 7
  text = (RESULTS / 'report.md').read_text()
  start = text.index('## Skip paths in study `roads`')
  committed = text[start : text.index('\n## ', start + 1)].strip().splitlines()
  assert committed == endpoints.render('roads', decided)[:-1]


def _holm(p_values):
  """Holm's adjusted p-values, written out here as the oracle (Holm 1979): sorted ascending,
  p_(i) * (m - i), made monotone, capped at 1."""
  order = sorted(range(len(p_values)), key=lambda i: p_values[i])
  adjusted, running = [0.0] * len(p_values), 0.0
  for rank, index in enumerate(order):
    running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
    adjusted[index] = running
  return adjusted


def test_the_committed_effects_agree_with_scipy():
  """An oracle outside the project's statistics: scipy's paired t-test and t-interval for each
  endpoint from the committed table give the report's effect, interval and Holm-adjusted p."""
  dice = _committed_dice()
  decided = {d.endpoint.name: d for d in endpoints.decisions(dice)}
  greater, less = [], []
  for name, arm, other in endpoints.ENDPOINTS:
    a, b = (np.array([dice[key][s] for s in sorted(dice[key])]) for key in (arm, other))
    interval = scipy_stats.t.interval(0.95, len(a) - 1, loc=(a - b).mean(), scale=scipy_stats.sem(a - b))
    effect = decided[name].effect
    assert (effect.mean, effect.low, effect.high) == pytest.approx(((a - b).mean(), *interval), rel=1e-9)
    greater.append(scipy_stats.ttest_rel(a, b, alternative='greater').pvalue)
    less.append(scipy_stats.ttest_rel(a, b, alternative='less').pvalue)
  assert [d.p_claim for d in decided.values()] == pytest.approx(_holm(greater), rel=1e-9)
  assert [d.p_opposite for d in decided.values()] == pytest.approx(_holm(less), rel=1e-9)
  assert [d.label for d in decided.values()].count(decision.NOT_SUPPORTED) == 1  # A2, as the README says
