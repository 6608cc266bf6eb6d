"""The MoNuSeg study's verdicts, failure counts and report, computed from results/runs.csv alone.

`analyse(rows, d0)` exists only once `study.next_stage` says 'done' (the protocol has no interim
analysis); `render` writes report.md from it. tests/studies/test_monuseg_study.py recomputes every
number of the committed report from the committed CSV.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from resunet_jax.ablation import decision, report, stats
from studies.monuseg_skip_residual import study

# (name, the Row measure, arm, the arm it is compared with, margin): PROTOCOL.md's E1-E7
ENDPOINTS = (
  ('E1: identity - wide, all skips (test Dice)', 'test_dice', 'identity-all', 'wide-all', 0.01),
  ('E2: identity - wide, no skips (test Dice)', 'test_dice', 'identity-none', 'wide-none', 0.01),
  ('E3: all skips - no skips, plain (test Dice)', 'test_dice', 'plain-all', 'plain-none', 0.01),
  ('E4: identity - wide, all skips (validation Dice over steps 0-400)', 'window_auc', 'identity-all', 'wide-all', 0.02),
  (
    'E5: identity - wide, no skips (validation Dice over steps 0-400)',
    'window_auc',
    'identity-none',
    'wide-none',
    0.02,
  ),
  (
    'E6: identity - wide, no skips (log10 gradient RMS enc_0 / dec_0)',
    'grad_log_ratio',
    'identity-none',
    'wide-none',
    0.3,
  ),
  ('E7: identity - wide, all skips (test boundary F1, 2 px)', 'test_boundary_f1', 'identity-all', 'wide-all', 0.01),
)
E8 = ('E8: residual gain at depth 4 - at depth 2, no skips (test Dice)', 0.01)


def value(row: study.Row, measure: str) -> float:
  """A row's endpoint measure: a Row field, or `test_<metric>`."""
  return row.test[measure[5:]] if measure.startswith('test_') else getattr(row, measure)


@dataclasses.dataclass(frozen=True)
class Analysis:
  """Everything report.md says, from the rows.

  Attributes:
    steps: the confirmatory budget; cuts: how many of `study.CUTS` the plan made.
    recipes: the matched and own rates; depth_rates: each tested depth's pair rate.
    primary, own: the eight decisions of each tier (one Holm family each, sign-flip decides).
    failures: per (tier, arm, depth) the number of runs, the failed ones and the test Dice
      interval over those that trained.
    fisher: per (tier, endpoint name) the two-sided Fisher p of the two arms' failure counts.
    trend_p: Page's p of the residual gain over depths 2, 3, 4 (None: depth 3 not tested).
  """

  steps: int
  cuts: int
  d0: float
  recipes: study.Recipes
  depth_rates: dict[int, float]
  primary: list[decision.Decision]
  own: list[decision.Decision]
  failures: dict[tuple[str, str, int], tuple[int, int, stats.Interval | None]]
  fisher: dict[tuple[str, str], float]
  trend_p: float | None


def gain(rows, depth: int, rates: tuple[float, float], steps: int, seeds) -> dict[int, float]:
  """seed -> test Dice of identity-none minus plain-none at `depth`, the two at `rates` (plain's, identity's)."""
  plain, identity = (
    study.by_seed(rows, arm, rate, steps, seeds, depth) for arm, rate in zip(study.DEPTH_ARMS, rates, strict=True)
  )
  return {s: identity[s].test['dice'] - plain[s].test['dice'] for s in sorted(set(plain) & set(identity))}


def tier(rows, rates: dict[str, float], depth_rates: dict[int, float], steps: int, seeds) -> list[decision.Endpoint]:
  """The eight endpoints with each arm at `rates[arm]` (depth 2's pair at `depth_rates[2]`; E8 only
  where depth 2 was tested)."""
  endpoints = []
  for name, measure, arm, other, delta in ENDPOINTS:
    a, b = study.by_seed(rows, arm, rates[arm], steps, seeds), study.by_seed(rows, other, rates[other], steps, seeds)
    paired = sorted(set(a) & set(b))
    endpoints.append(
      decision.Endpoint.paired(name, [value(a[s], measure) - value(b[s], measure) for s in paired], delta)
    )
  if 2 not in depth_rates:
    return endpoints
  gain4 = gain(rows, 4, (rates['plain-none'], rates['identity-none']), steps, seeds)
  gain2 = gain(rows, 2, (depth_rates[2],) * 2, steps, study.SEEDS)
  paired = sorted(set(gain4) & set(gain2))
  endpoints.append(decision.Endpoint.paired(E8[0], [gain4[s] - gain2[s] for s in paired], E8[1]))
  return endpoints


def analyse(rows: Sequence[study.Row], d0: float) -> Analysis:
  """The study's analysis; raises ValueError unless every stage is done."""
  stage = study.next_stage(rows, d0, plan_committed=True)
  if stage.name != 'done':
    raise ValueError(f'the study is not done (next: {stage.name}, {len(stage.runs)} runs): no interim analysis')
  steps, cuts, _ = study.plan(rows)
  recipes = study.recipes(rows, steps, d0)
  kept = study.scope(cuts)
  depths, own_seeds = kept.depths, kept.own_seeds
  depth_rates = {d: study.choose(rows, study.DEPTH_ARMS, steps, d0, d, kept.depth_tuning_seeds).rate for d in depths}
  matched = dict.fromkeys(study.ARMS, recipes.matched.rate)
  tiers = {'primary': (matched, study.SEEDS), 'own': (recipes.own, own_seeds)}
  decided = {
    name: decision.decide(tier(rows, r, depth_rates, steps, s), test='sign_flip') for name, (r, s) in tiers.items()
  }
  failures, fisher = {}, {}
  for name, (rates, seeds) in tiers.items():
    arms = [(arm, rates[arm], 4) for arm in study.ARMS] + [
      (arm, depth_rates[d], d) for d in depths for arm in study.DEPTH_ARMS
    ]
    for arm, rate, depth in arms:
      runs = list(study.by_seed(rows, arm, rate, steps, seeds, depth).values())
      trained = [r.test['dice'] for r in runs if not study.failed(r, d0)]
      interval = stats.t_interval(trained) if len(trained) >= 2 else None
      failures[name, arm, depth] = (len(runs), len(runs) - len(trained), interval)
    for endpoint, _, arm, other, _ in ENDPOINTS[:3]:
      (n_a, f_a, _), (n_b, f_b, _) = failures[name, arm, 4], failures[name, other, 4]
      fisher[name, endpoint] = stats.failure_test(f_a, n_a, f_b, n_b)
  trend = None
  if 3 in depth_rates:
    rates = {**depth_rates, 4: recipes.matched.rate}
    gains = {d: gain(rows, d, (rates[d],) * 2, steps, study.SEEDS) for d in (2, 3, 4)}
    trend = stats.trend_p([[gains[d][s] for d in (2, 3, 4)] for s in study.SEEDS])
  return Analysis(steps, cuts, d0, recipes, depth_rates, decided['primary'], decided['own'], failures, fisher, trend)


def render(a: Analysis, rows: Sequence[study.Row]) -> str:
  """report.md: the two tiers side by side, the failure table, the trend test and E6 over the tuning runs."""
  lines = [
    '# The MoNuSeg skip/residual study: report (pre-registered: PROTOCOL.md)',
    '',
    f'Budget {a.steps} steps; cuts made: {"; ".join(study.CUTS[: a.cuts]) if a.cuts else "none"}. '
    f'Matched rate {a.recipes.matched.rate:g}'
    + (' (at the grid edge after both extensions)' if a.recipes.matched.edge else '')
    + '; own rates '
    + ', '.join(f'{arm} {rate:g}' for arm, rate in a.recipes.own.items())
    + '; depth pair rates '
    + ', '.join(f'depth {d} {rate:g}' for d, rate in a.depth_rates.items())
    + ''.join(f', depth {d} not tested' for d in study.DEPTHS if d not in a.depth_rates)
    + ('' if 2 in a.depth_rates else ' (E8 not tested)')
    + f'. A run failed when its final validation Dice is below D0 + {study.FAILURE_MARGIN:g} = '
    f'{a.d0 + study.FAILURE_MARGIN:.4f} '
    f'(D0 = {a.d0:.4f}, the all-nucleus prediction).',
    '',
    '## Primary: matched recipe (one Holm family over E1-E8; the exact sign-flip test decides)',
    '',
    *report.decision_table(a.primary, check=True),
    '',
    '## Secondary: each arm at its own tuned rate (a Holm family of its own)',
    '',
    *report.decision_table(a.own, check=True),
    '',
    '## Failures and the Dice of the runs that trained',
    '',
    '| tier | arm | depth | failed / runs | test Dice of trained runs [95% CI] |',
    '|---|---|---|---|---|',
  ]
  for (name, arm, depth), (n, failed, interval) in a.failures.items():
    lines.append(f'| {name} | {arm} | {depth} | {failed} / {n} | {interval.format() if interval else "-"} |')
  lines += ['', '| tier | comparison | Fisher exact p (two-sided) |', '|---|---|---|']
  lines += [f'| {name} | {endpoint} | {p:.3g} |' for (name, endpoint), p in a.fisher.items()]
  lines += [
    '',
    "Page's trend test of the residual gain over depths 2, 3, 4 (one-sided): "
    + (f'p = {a.trend_p:.3g}.' if a.trend_p is not None else 'not tested (depth 3 was cut).'),
    '',
    '## E6 over the tuning runs (identity - wide, no skips; seeds 1000-1001), margin 0.3',
    '',
    '| rate | identity-none | wide-none | difference |',
    '|---|---|---|---|',
  ]
  for rate in sorted({r.run.rate for r in rows if r.run.stage == 'tuning'}):
    pair = [study.by_seed(rows, arm, rate, a.steps, study.TUNING_SEEDS) for arm in ('identity-none', 'wide-none')]
    if all(len(p) == len(study.TUNING_SEEDS) for p in pair):
      means = [np.mean([r.grad_log_ratio for r in p.values()]) for p in pair]
      lines.append(f'| {rate:g} | {means[0]:.3f} | {means[1]:.3f} | {means[0] - means[1]:+.3f} |')
  return '\n'.join(lines) + '\n'
