"""The study's pre-registered analysis (PROTOCOL.md beside this file), from its results.csv rows alone.

`decisions(rows)` is every verdict of the study: a reader recomputes them from the committed
table with

  from studies.skip_residual import analysis, protocol
  analysis.decisions(protocol.read_rows('studies/skip_residual/results/results.csv'))

The eight primary endpoints (claims 1-4 x two datasets), each residual (`identity`) minus
`plain`, paired by seed, each arm at its own chosen recipe and learning rate:

  claim 1  validation-Dice AUC, all skips, stage 'primary'                       delta 0.02
  claim 2  log10 gradient RMS enc_0 / dec_0 at initialisation, no skips, recipe
           'lecun-none', stage 'initial' (seeds of the primary tier)             delta 0.3
  claim 3  the coefficient of `residual` in boundary F1 (1 px) ~ 1 + Dice + residual
           over the primary all-skip runs (OLS, df n - 3)                         delta 0.01
  claim 4  the per-seed least-squares slope over depth of the test-Dice gain, no
           skips (depths 2, 3, 5 from stage 'depth', 4 from 'primary'), averaged
           over seeds: a seed random effect by the summary-statistics method      delta 0.01

Holm over the eight (`decision.decide`). Claim 2's validity check comes first: among the no-skip
(block, recipe) arms of the tuning stage, every arm that failed to train (its rows' `failed` set
at every learning rate: `protocol.rows`) must have a lower measure than every arm that trained;
otherwise the endpoint is marked invalid and `decide` calls it 'inconclusive' whatever its test says.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from resunet_jax.ablation import decision, stats

DELTAS = {1: 0.02, 2: 0.3, 3: 0.01, 4: 0.01}
CLAIMS = {
  1: 'residual connections speed up convergence',
  2: 'residual connections ease vanishing gradients',
  3: 'residual connections sharpen edges and details',
  4: 'residual connections allow deeper networks',
}
RESIDUAL, PLAIN = 'identity', 'plain'
SKIPS = ('all', 'none')


def short(data: str) -> str:
  """'synthetic_roads/size32' -> 'roads'."""
  return data.split('/')[0].removeprefix('synthetic_')


def datasets(rows: Sequence[dict]) -> list[str]:
  """The datasets of the study's endpoints, in order of first appearance (not the 'boundary'
  stage's three-class data: a secondary analysis, `boundary_lines`)."""
  return list(dict.fromkeys(row['data'] for row in rows if row['stage'] != 'boundary'))


def tuning_seeds(rows: Sequence[dict]) -> set[int]:
  """The seeds of the tuning stage (never those of a test-split result)."""
  return {row['seed'] for row in rows if row['stage'] == 'tune'}


def _by_seed(rows, *, stage, data, block, skips, key, depth=None, recipe=None, value=float):
  """seed -> `value(row[key])` of one arm's rows; the tuning seeds are left out of every stage
  but 'tune'."""
  tuning = tuning_seeds(rows) if stage != 'tune' else set()
  out = {}
  for row in rows:
    if (row['stage'], row['data'], row['block'], row['skips']) != (stage, data, block, skips):
      continue
    if (depth is not None and row['depth'] != depth) or (recipe is not None and row['recipe'] != recipe):
      continue
    if key in row and row['seed'] not in tuning:
      out[row['seed']] = value(row[key])
  return out


def paired(rows, *, stage, data, skips, key, depth=None, recipe=None, value=float) -> list[float]:
  """Per-seed `value(key)` of the residual arm minus the plain arm, over the seeds both have."""
  picked = dict(stage=stage, data=data, skips=skips, key=key, depth=depth, recipe=recipe, value=value)
  residual, plain = _by_seed(rows, block=RESIDUAL, **picked), _by_seed(rows, block=PLAIN, **picked)
  return [residual[s] - plain[s] for s in sorted(set(residual) & set(plain))]


def claim1(rows, data) -> decision.Endpoint:
  differences = paired(rows, stage='primary', data=data, skips='all', key='val_auc')
  return decision.Endpoint.paired(f'claim 1 / {short(data)}', differences, DELTAS[1])


def claim2(rows, data) -> decision.Endpoint:
  differences = paired(rows, stage='initial', data=data, skips='none', key='log10_grad_ratio', recipe='lecun-none')
  return decision.Endpoint.paired(f'claim 2 / {short(data)}', differences, DELTAS[2])


def edge_regression(rows, data, key: str = 'boundary_f1_1px') -> tuple[float, float, int]:
  """Claim 3's OLS fit over the primary all-skip runs of both arms: `key` (boundary F1 at 1 px;
  other tolerances are secondary) on an intercept, the run's Dice (the same per-image scores,
  `measures.edges`) and a residual indicator. Returns the residual coefficient, its standard
  error and the residual df."""
  picked = [
    row
    for row in rows
    if row['stage'] == 'primary'
    and row['data'] == data
    and row['skips'] == 'all'
    and row['block'] in (RESIDUAL, PLAIN)
    and key in row
  ]
  n = len(picked)
  if n < 4:
    return float('nan'), float('nan'), 0
  x = np.asarray([[1.0, row['dice'], float(row['block'] == RESIDUAL)] for row in picked])
  y = np.asarray([row[key] for row in picked])
  coef, *_ = np.linalg.lstsq(x, y, rcond=None)
  df = n - 3
  sigma2 = float(np.sum((y - x @ coef) ** 2)) / df
  covariance = sigma2 * np.linalg.pinv(x.T @ x)
  return float(coef[2]), math.sqrt(max(float(covariance[2, 2]), 0.0)), df


def claim3(rows, data) -> decision.Endpoint:
  estimate, se, df = edge_regression(rows, data)
  return decision.Endpoint(f'claim 3 / {short(data)}', estimate, se, df, DELTAS[3])


def depth_gains(rows, data) -> dict[int, dict[int, float]]:
  """seed -> depth -> test-Dice gain (residual minus plain), no skips: the depth stage, and the
  primary stage at its own depth."""
  out: dict[int, dict[int, float]] = {}
  depths = sorted({row['depth'] for row in rows if row['stage'] == 'depth' and row['data'] == data})
  primary = sorted({row['depth'] for row in rows if row['stage'] == 'primary' and row['data'] == data})
  for stage, levels in (('depth', depths), ('primary', primary)):
    for depth in levels:
      residual = _by_seed(rows, stage=stage, data=data, block=RESIDUAL, skips='none', depth=depth, key='test_dice')
      plain = _by_seed(rows, stage=stage, data=data, block=PLAIN, skips='none', depth=depth, key='test_dice')
      for seed in set(residual) & set(plain):
        out.setdefault(seed, {})[depth] = residual[seed] - plain[seed]
  return out


def slopes(gains: dict[int, dict[int, float]]) -> list[float]:
  """Each seed's least-squares slope of gain over depth, for the seeds with every depth."""
  every = set.union(set(), *(set(by) for by in gains.values())) if gains else set()
  out = []
  for seed in sorted(gains):
    if set(gains[seed]) != every or len(every) < 2:
      continue
    depth = np.asarray(sorted(every), np.float64)
    gain = np.asarray([gains[seed][d] for d in sorted(every)])
    out.append(float(np.polyfit(depth, gain, 1)[0]))
  return out


def _slope_gains(gains: dict[int, dict[int, float]]) -> str:
  """', mean gain ... at depths ... over the N seeds with every depth' (the seeds `slopes` uses), or ''."""
  every = set.union(set(), *(set(by) for by in gains.values())) if gains else set()
  seeds = [seed for seed in sorted(gains) if set(gains[seed]) == every]
  if len(every) < 2 or not seeds:
    return ''
  means = ', '.join(f'{np.mean([gains[s][d] for s in seeds]):.3f}' for d in sorted(every))
  return (
    f' (mean gain {means} at depths {", ".join(map(str, sorted(every)))}, over the {len(seeds)} seeds with every depth)'
  )


def claim4(rows, data) -> decision.Endpoint:
  return decision.Endpoint.paired(f'claim 4 / {short(data)}', slopes(depth_gains(rows, data)), DELTAS[4])


@dataclasses.dataclass(frozen=True)
class Validity:
  """Claim 2's validity check on one dataset.

  Attributes:
    failed: the measure of each no-skip (block, recipe) arm that failed to train.
    trained: that of each that trained.
    valid: every failed arm's measure below every trained arm's (True when none failed).
  """

  failed: dict[str, float]
  trained: dict[str, float]

  @property
  def valid(self) -> bool:
    return not self.failed or not self.trained or max(self.failed.values()) < min(self.trained.values())


def validity(rows, data) -> Validity:
  """The tuning stage's no-skip arms: failed (the `failed` column set at every rate) or
  trained, each with its measure at initialisation (stage 'initial', the tuning seed)."""
  failed_at: dict[str, list[int]] = {}
  for row in rows:
    if (row['stage'], row['data'], row['skips']) == ('tune', data, 'none'):
      failed_at.setdefault(f'{row["block"]} {row["recipe"]}', []).append(int(row['failed']))
  tune_seeds = tuning_seeds(rows)
  measure = {
    f'{row["block"]} {row["recipe"]}': row['log10_grad_ratio']
    for row in rows
    if (row['stage'], row['data'], row['skips']) == ('initial', data, 'none') and row['seed'] in tune_seeds
  }
  failed = {arm: measure[arm] for arm, flags in failed_at.items() if all(flags) and arm in measure}
  trained = {arm: measure[arm] for arm, flags in failed_at.items() if not all(flags) and arm in measure}
  return Validity(failed, trained)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One endpoint's verdict: `decided` is `decision.decide`'s, with claim 2's validity check
  (an `Endpoint.invalid` reason) already in it."""

  claim: int
  data: str
  decided: decision.Decision

  @property
  def label(self) -> str:
    return self.decided.label

  @property
  def reason(self) -> str:
    return self.decided.endpoint.invalid


INVALID = 'the measure does not flag the failed arm'  # claim 2's validity check failed


def decisions(rows: Sequence[dict]) -> list[Verdict]:
  """Every primary endpoint's verdict, claims in order, datasets in table order (Holm over all)."""
  build = {1: claim1, 2: claim2, 3: claim3, 4: claim4}
  keys = [(claim, data) for claim in build for data in datasets(rows)]
  endpoints = []
  for claim, data in keys:
    endpoint = build[claim](rows, data)
    if claim == 2 and not validity(rows, data).valid:
      endpoint = dataclasses.replace(endpoint, invalid=INVALID)
    endpoints.append(endpoint)
  return [Verdict(claim, data, d) for (claim, data), d in zip(keys, decision.decide(endpoints), strict=True)]


def failures(rows: Sequence[dict]) -> dict[tuple[str, str, str], tuple[int, int]]:
  """(stage, data, arm) -> (failed runs, runs), for every trained stage."""
  out: dict[tuple[str, str, str], tuple[int, int]] = {}
  for row in rows:
    if 'failed' not in row or row['stage'] == 'initial':
      continue
    key = (row['stage'], row['data'], f'{row["arm"]} {row["recipe"]}')
    failed, total = out.get(key, (0, 0))
    out[key] = (failed + int(row['failed']), total + 1)
  return out


def headline(rows: Sequence[dict]) -> dict[str, dict]:
  """The three numbers a reviewer asks first, per dataset: residual minus plain test Dice at
  the plateau (primary stage, with and without skips), plain without skips (its test Dice, and
  its logit spread and dead-ReLU fraction at initialisation), the depth slope."""
  out = {}
  for data in datasets(rows):
    plain_none = _by_seed(rows, stage='primary', data=data, block=PLAIN, skips='none', key='test_dice')
    recipes = {
      row['recipe'] for row in rows if (row['stage'], row['data'], row['arm']) == ('primary', data, 'plain-none')
    }
    initial = {
      key: _by_seed(rows, stage='initial', data=data, block=PLAIN, skips='none', key=key, recipe=recipe)
      for key in ('logit_std', 'dead_relu')
      for recipe in recipes
    }
    out[short(data)] = {
      'gain_all_skips': stats.t_interval(paired(rows, stage='primary', data=data, skips='all', key='test_dice')),
      'gain_no_skips': stats.t_interval(paired(rows, stage='primary', data=data, skips='none', key='test_dice')),
      'plain_no_skips_dice': stats.t_interval(plain_none.values()),
      'plain_no_skips_logit_std': stats.t_interval(initial.get('logit_std', {}).values()),
      'plain_no_skips_dead_relu': stats.t_interval(initial.get('dead_relu', {}).values()),
      'depth_slope': claim4(rows, data).interval(),
      'depth_gains': _slope_gains(depth_gains(rows, data)),
      **{
        f'bootstrap_{skips}_skips': '[{}, {}]'.format(
          *(_fmt(v) for v in hierarchical_bootstrap(per_image_differences(rows, stage='primary', data=data, skips=s)))
        )
        for skips, s in (('all', 'all'), ('no', 'none'))
      },
    }
  return out


# ---- the report ----


def _fmt(value: float, digits: int = 3) -> str:
  return 'n/a' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  return [
    '| ' + ' | '.join(header) + ' |',
    '|' + '---|' * len(header),
    *('| ' + ' | '.join(row) + ' |' for row in body),
  ]


def tuning_table(rows: Sequence[dict], data: str) -> list[str]:
  """The robustness curve of one dataset: final validation Dice of every (block, skips) arm at
  every recipe and learning rate of the tuning stage; the chosen setting in bold."""
  tune = [row for row in rows if row['stage'] == 'tune' and row['data'] == data]
  if not tune:
    return []
  rates = sorted({row['learning_rate'] for row in tune})
  recipes = list(dict.fromkeys(row['recipe'] for row in tune))
  arms = list(dict.fromkeys(row['arm'] for row in tune))
  chosen = {
    (row['arm'], row['recipe'], row['learning_rate'])
    for row in rows
    if row['stage'] == 'primary' and row['data'] == data
  }
  body = []
  for arm in arms:
    for recipe in recipes:
      cells = []
      for rate in rates:
        found = [r for r in tune if (r['arm'], r['recipe'], r['learning_rate']) == (arm, recipe, rate)]
        cell = _fmt(found[0]['val_dice']) if found else '-'
        cells.append(f'**{cell}**' if (arm, recipe, rate) in chosen else cell)
      body.append([f'`{arm}`', recipe, *cells])
  return _table(['arm', 'recipe', *(f'lr {rate:g}' for rate in rates)], body)


def pilot_table(rows: Sequence[dict], data: str) -> list[str]:
  """Mean final validation Dice and test Dice of each primary arm at each pilot budget."""
  pilot = [row for row in rows if row['stage'] == 'pilot' and row['data'] == data]
  if not pilot:
    return []
  budgets = sorted({row['steps'] for row in pilot})
  body = []
  for arm in dict.fromkeys(row['arm'] for row in pilot):
    cells = []
    for budget in budgets:
      at = [row for row in pilot if row['arm'] == arm and row['steps'] == budget]
      val = np.mean([row['val_dice'] for row in at]) if at else float('nan')
      test = np.mean([row['test_dice'] for row in at if 'test_dice' in row]) if at else float('nan')
      cells.append(f'{_fmt(val)} / {_fmt(test)} (n={len(at)})')
    body.append([f'`{arm}`', *cells])
  return _table(['arm', *(f'{b} steps: val / test Dice' for b in budgets)], body)


PLATEAU_TOLERANCE = 0.01  # PROTOCOL.md: B is the first budget within this of the longest's mean validation Dice


def plateau(curves: dict[tuple, dict[int, list[float]]], budgets: Sequence[int], tolerance: float) -> int:
  """The smallest budget at which every arm's mean validation Dice is within `tolerance` of
  (or above) its mean at the longest budget.

  Args:
    curves: arm -> budget -> final validation Dice of each of its pilot runs.
  """
  longest = max(budgets)
  for budget in sorted(budgets):
    if all(np.mean(by[budget]) >= np.mean(by[longest]) - tolerance for by in curves.values()):
      return budget
  return longest


def pilot_plateau(rows: Sequence[dict]) -> int | None:
  """The budget the plateau rule gives on the pilot's rows (every dataset's primary arms), before
  any cut; None without pilot rows."""
  pilot = [row for row in rows if row['stage'] == 'pilot']
  if not pilot:
    return None
  curves: dict[tuple, dict[int, list[float]]] = {}
  for row in pilot:
    curves.setdefault((row['data'], row['arm']), {}).setdefault(row['steps'], []).append(row['val_dice'])
  return plateau(curves, sorted({row['steps'] for row in pilot}), PLATEAU_TOLERANCE)


def markdown(
  rows: Sequence[dict],
  *,
  progress: dict[str, tuple[int, int | None]],
  plan: dict,
  final: bool,
  figures: Sequence[str] = (),
) -> str:
  """The study's report.md from its rows.

  Args:
    rows: the study's results.csv rows (`protocol.read_rows`).
    progress: stage -> (runs done, runs planned or None before the plan makes them).
    plan: plan.json's content (choices, cuts, B), or {} before the tuning stage ends.
    final: the primary and depth stages are complete. Verdicts are printed only then (the
      protocol's stopping rule: no interim analysis).
    figures: file names of the figures beside the report (`plots.study_figures`).
  """
  trained = [row for row in rows if row['stage'] != 'initial']
  hours = sum(row.get('wall_s', 0.0) for row in {row['run_id']: row for row in trained}.values()) / 3600
  lines = [
    '# The skip/residual study (studies/skip_residual/PROTOCOL.md)',
    '',
    f'Command: `{plan.get("command", "python studies/skip_residual/run.py")}`',
    '',
    f'Compute so far: {hours:.2f} h of training and measurement (the sum over finished runs). '
    f'results.csv has {len(rows)} rows: {len({row["run_id"] for row in trained})} distinct trained runs '
    f'(a run two stages share is one run in two rows) and {len(rows) - len(trained)} networks measured at '
    'initialisation without training.',
    '',
    '| stage | runs done | planned |',
    '|---|---|---|',
    *(f'| {stage} | {done} | {"-" if planned is None else planned} |' for stage, (done, planned) in progress.items()),
    '',
  ]
  if 'cuts' in plan:
    lines += [
      f'Cuts (PROTOCOL.md, "Compute budget"): {"; ".join(plan.get("cuts") or []) or "none"}; '
      f'projected rest after tuning: {plan.get("projected_minutes", float("nan")):.0f} min. '
      f'Plateau budget B: {plan.get("budget") or "not fixed yet (the pilot is not complete)"}'
      + (
        f' (the plateau rule alone gives {pilot_plateau(rows)} steps; cut 4 caps it, so B is not a plateau)'
        if plan.get('budget') and pilot_plateau(rows) not in (None, plan.get('budget'))
        else ''
      )
      + '.',
      '',
    ]
  if final:
    lines += [
      '## Verdicts',
      '',
      *verdict_lines(rows),
      '',
    ]
    if plateau_complete(progress):
      lines += [
        f'## Verdicts at the plateau budget ({pilot_plateau(rows)} steps; PROTOCOL.md amendment 8)',
        '',
        'The primary and depth stages trained again at the budget the plateau rule gives, which cut 4 '
        'had capped: the same endpoints and tests, Holm-adjusted as a family of their own. Amendment 8 '
        'was made after the verdicts at B had been read, so these verdicts are post hoc; both sets stand '
        'in the report.',
        '',
        *verdict_lines(at_plateau(rows)),
        '',
      ]
    lines += [
      '## Secondary analyses (effects and intervals, no verdicts)',
      '',
      *secondary_lines(rows),
      *knockout_lines(rows),
      *(f'![{name}]({name})' for name in figures),
      '',
    ]
  else:
    lines += [
      '## Verdicts',
      '',
      'None yet: the protocol computes them once, when the primary and depth stages are complete '
      '(no interim analysis). The tables below are the tuning and pilot stages, which choose settings '
      'and carry no verdict.',
      '',
    ]
  for data in datasets(rows):
    lines += [f'## {short(data)}', '']
    table = tuning_table(rows, data)
    if table:
      lines += [
        'Tuning (seed 1000, the shortest budget): final validation Dice of each arm at each recipe and '
        'peak learning rate, the robustness curve; bold: the setting chosen for the later stages.',
        '',
        *table,
        '',
      ]
    table = pilot_table(rows, data)
    if table:
      lines += ['Pilot (seeds 1000+): mean final validation / test Dice per budget.', '', *table, '']
    failed = [(key, counts) for key, counts in failures(rows).items() if key[1] == data and counts[0]]
    if failed:
      lines += [
        'Runs that failed to train (final validation Dice not 0.05 above the constant all-background '
        "prediction's: PROTOCOL.md amendment 5, made after 72 of the tuning runs had been seen): "
        + '; '.join(f'{stage} `{arm}`: {f}/{n}' for (stage, _, arm), (f, n) in failed)
        + '.',
        '',
      ]
  return '\n'.join(lines)


# PROTOCOL.md amendment 8: the stages that repeat the verdict stages at the plateau -> the stage each repeats
PLATEAU_STAGES = {'plateau_primary': 'primary', 'plateau_depth': 'depth'}


def at_plateau(rows: Sequence[dict]) -> list[dict]:
  """The rows with the plateau stages standing in for the primary and depth stages they repeat
  (PROTOCOL.md amendment 8): the same analysis then gives the verdicts at the plateau budget."""
  repeated = set(PLATEAU_STAGES.values())
  kept = [row for row in rows if row['stage'] not in repeated]
  return [{**row, 'stage': PLATEAU_STAGES.get(row['stage'], row['stage'])} for row in kept]


def plateau_complete(progress: dict[str, tuple[int, int | None]]) -> bool:
  """Every plateau stage has been planned and has all its runs."""
  return all(
    stage in progress and progress[stage][1] is not None and progress[stage][0] == progress[stage][1]
    for stage in PLATEAU_STAGES
  )


def verdict_lines(rows: Sequence[dict]) -> list[str]:
  """The verdict table and the headline numbers."""
  body = []
  verdicts = decisions(rows)
  for verdict in verdicts:
    d = verdict.decided
    body.append(
      [
        f'{verdict.claim}: {CLAIMS[verdict.claim]}',
        short(verdict.data),
        d.effect.format(3) if d.effect.n > 1 else _fmt(d.effect.mean),
        '[{}, {}]'.format(*(_fmt(v) for v in endpoint_bootstrap(rows, verdict.claim, verdict.data))),
        f'{d.p_claim:.3g}',
        f'{d.p_opposite:.3g}',
        f'{d.p_equivalence:.3g}',
        f'**{verdict.label}**' + (f' ({verdict.reason})' if verdict.reason else ''),
      ]
    )
  header = ['claim', 'data', 'effect [95% t-CI]', 'bootstrap 95%', 'p claim', 'p opposite', 'p equivalence', 'verdict']
  lines = _table(header, body)
  lines += [
    '',
    f'p-values are one-sided and Holm-adjusted over the {len(verdicts)} endpoints; the bootstrap interval '
    '(seeds resampled) stands beside the t-interval and decides nothing.',
    '',
  ]
  for name, numbers in headline(rows).items():
    lines.append(
      f'- {name}: residual minus plain test Dice {numbers["gain_all_skips"].format()} with skips '
      f'(hierarchical bootstrap {numbers["bootstrap_all_skips"]}), {numbers["gain_no_skips"].format()} without '
      f'({numbers["bootstrap_no_skips"]}); plain without skips {numbers["plain_no_skips_dice"].format()} '
      f'(logit std at initialisation {numbers["plain_no_skips_logit_std"].format()}, dead ReLU fraction '
      f'{numbers["plain_no_skips_dead_relu"].format()}); depth slope of the residual gain '
      f'{numbers["depth_slope"].format(4)} per level{numbers["depth_gains"]}.'
    )
  return lines


# ---- bootstrap and knock-outs (secondary: intervals, never a verdict) ----

BOOTSTRAP_REPLICATES = 4000


def hierarchical_bootstrap(
  differences: np.ndarray, replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0
) -> tuple[float, float]:
  """The 95% percentile interval of the mean paired difference, resampling seeds, then test
  images within each drawn seed (both arms at the same images: paired image by image).

  Args:
    differences: `[seeds, images]` per-image differences of paired runs.
  """
  d = np.asarray(differences, np.float64)
  if d.ndim != 2 or d.shape[0] < 2:
    return float('nan'), float('nan')
  rng = np.random.default_rng(seed)
  seeds, images = d.shape
  drawn = rng.integers(0, seeds, (replicates, seeds))
  pixels = rng.integers(0, images, (replicates, seeds, images))
  means = d[drawn[..., None], pixels].mean((1, 2))
  low, high = np.percentile(means, [2.5, 97.5])
  return float(low), float(high)


def seed_bootstrap(
  values: Sequence[float], replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0
) -> tuple[float, float]:
  """The 95% percentile interval of the mean of per-seed values, resampling seeds."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return float('nan'), float('nan')
  drawn = np.random.default_rng(seed).integers(0, v.size, (replicates, v.size))
  low, high = np.percentile(v[drawn].mean(1), [2.5, 97.5])
  return float(low), float(high)


def per_image_differences(rows, *, stage, data, skips, key='dice_per_image') -> np.ndarray:
  """`[seeds, images]` residual minus plain per-image values, over the seeds both arms have."""
  residual = _by_seed(rows, stage=stage, data=data, block=RESIDUAL, skips=skips, key=key, value=list)
  plain = _by_seed(rows, stage=stage, data=data, block=PLAIN, skips=skips, key=key, value=list)
  seeds = sorted(set(residual) & set(plain))
  if not seeds:
    return np.zeros((0, 0))
  return np.asarray([np.asarray(residual[s]) - np.asarray(plain[s]) for s in seeds])


def endpoint_bootstrap(rows, claim: int, data: str) -> tuple[float, float]:
  """A bootstrap interval beside each primary endpoint's t-interval: seeds resampled (claims 1,
  2 and 4: their per-seed values; claim 3: the runs of a seed drawn together and the regression
  refitted)."""
  if claim == 1:
    return seed_bootstrap(paired(rows, stage='primary', data=data, skips='all', key='val_auc'))
  if claim == 2:
    return seed_bootstrap(
      paired(rows, stage='initial', data=data, skips='none', key='log10_grad_ratio', recipe='lecun-none')
    )
  if claim == 4:
    return seed_bootstrap(slopes(depth_gains(rows, data)))
  picked = [
    row
    for row in rows
    if (row['stage'], row['data'], row['skips']) == ('primary', data, 'all')
    and row['block'] in (RESIDUAL, PLAIN)
    and 'boundary_f1_1px' in row
  ]
  seeds = sorted({row['seed'] for row in picked})
  if len(seeds) < 3:
    return float('nan'), float('nan')
  rng = np.random.default_rng(0)
  estimates = []
  for _ in range(BOOTSTRAP_REPLICATES // 4):
    drawn = rng.choice(seeds, len(seeds))
    sample = [dict(row, seed=i) for i, s in enumerate(drawn) for row in picked if row['seed'] == s]
    estimate, _, _ = edge_regression(sample, data)
    if math.isfinite(estimate):
      estimates.append(estimate)
  if not estimates:
    return float('nan'), float('nan')
  low, high = np.percentile(estimates, [2.5, 97.5])
  return float(low), float(high)


def knockout_effects(rows, data: str, arm: str) -> dict[str, stats.Interval]:
  """Test-Dice change (knocked out minus intact) of the primary stage's `arm`, t-intervals over
  seeds: each single skip zeroed and mean-filled, each block's shortcut and branch deleted,
  and 'chosen <kind>': per run, the knock-out with the best validation Dice (intact excluded)
  scored on test."""
  changes: dict[str, list[float]] = {}
  for row in rows:
    if (row['stage'], row['data'], row['arm']) != ('primary', data, arm) or not row.get('knockouts'):
      continue
    for kind, table in row['knockouts'].items():
      labels, dice = table['labels'], table['dice']
      intact = labels.index('none') if 'none' in labels else len(labels) - 1  # skip masks: all ones last
      for index, label in enumerate(labels):
        if index == intact or (kind in ('skip', 'skip_mean') and label.count('0') != 1):
          continue
        changes.setdefault(f'{kind} {label}', []).append(dice[index] - dice[intact])
      if 'val_dice' in table:
        candidates = [i for i in range(len(labels)) if i != intact]
        if candidates:
          best = max(candidates, key=lambda i: table['val_dice'][i])
          changes.setdefault(f'chosen {kind}', []).append(dice[best] - dice[intact])
  return {name: stats.t_interval(values) for name, values in changes.items()}


def knockout_lines(rows: Sequence[dict]) -> list[str]:
  """The knock-out tables of the primary all-skip arms, per dataset (secondary: no verdicts)."""
  lines = []
  for data in datasets(rows):
    for arm in (f'{PLAIN}-all', f'{RESIDUAL}-all'):
      effects = knockout_effects(rows, data, arm)
      if not effects:
        continue
      body = [[f'`{name}`', interval.format(3)] for name, interval in effects.items()]
      lines += [
        f'Knock-outs of `{arm}` on {short(data)} (test Dice change, 95% t-interval over seeds; `chosen`: '
        'per run the knock-out with the best validation Dice, scored on test):',
        '',
        *_table(['knock-out', 'test Dice change'], body),
        '',
      ]
  return lines


# ---- secondary analyses (PROTOCOL.md: effects and intervals, never a verdict word) ----


OTHER_TOLERANCES = (0, 2)  # boundary F1 tolerances (px) beside the primary 1 px


def _runs(rows, data: str) -> list[dict]:
  """The trained runs at B of one dataset (stages 'primary' and 'secondary'); a secondary row
  that repeats a primary run (the same config, e.g. 'plain-wide' under amendment 4) is left out."""
  primary = {row['run_id'] for row in rows if (row['stage'], row['data']) == ('primary', data)}
  return [
    row
    for row in rows
    if row['data'] == data
    and (row['stage'] == 'primary' or (row['stage'] == 'secondary' and row['run_id'] not in primary))
  ]


def _median(values) -> float:
  finite = [v for v in values if math.isfinite(v)]
  return float(np.median(finite)) if finite else float('nan')


def arm_table(rows: Sequence[dict], data: str) -> list[str]:
  """Every arm trained at B on one dataset, seeds pooled: runs and failures, test Dice (and over
  the runs that trained where some failed), boundary F1 at 1 px, HD95 (the median of the runs'
  medians over non-empty predictions) with the empty-prediction rate beside it."""
  groups: dict[tuple, list[dict]] = {}
  for row in _runs(rows, data):
    groups.setdefault((row['stage'], row['arm'], row['recipe'], row['learning_rate']), []).append(row)
  body = []
  for (stage, arm, recipe, rate), members in groups.items():
    failed = sum(int(row.get('failed', 0)) for row in members)
    trained = [row['test_dice'] for row in members if not row.get('failed', 0)]
    body.append(
      [
        stage,
        f'`{arm}`',
        recipe,
        f'{rate:g}',
        f'{len(members)} ({failed})',
        f'{members[0].get("params", 0):,}',
        stats.t_interval(row['test_dice'] for row in members).format(3),
        stats.t_interval(trained).format(3) if failed else 'as left',
        stats.t_interval(row['boundary_f1_1px'] for row in members if 'boundary_f1_1px' in row).format(3),
        _fmt(_median(row.get('hd95_median', np.nan) for row in members), 2),
        _fmt(float(np.mean([row.get('empty', np.nan) for row in members])), 3),
      ]
    )
  header = [
    'stage', 'arm', 'recipe', 'lr', 'runs (failed)', 'params', 'test Dice [95% t-CI]', 'over trained runs',
    'boundary F1 1 px', 'HD95 median (px)', 'empty rate',
  ]  # fmt: skip
  return _table(header, body) if body else []


def secondary_effects(rows: Sequence[dict], data: str) -> dict[str, stats.Interval]:
  """The protocol's secondary comparisons on one dataset, each a paired difference over seeds
  (t-interval) or a regression coefficient (its t-interval): the `projection` block against both
  primary blocks, residual minus plain under 'lecun-none', the edge gain at equal Dice at 0 and
  2 px, the error in the band around true edges and in the interior, recall of roads by width,
  and log10 of the relative update size per block without skips."""
  out: dict[str, stats.Interval] = {}

  def arm(stage, block, skips, key, recipe=None):
    return _by_seed(rows, stage=stage, data=data, block=block, skips=skips, key=key, recipe=recipe)

  for skips in SKIPS:
    projection = arm('secondary', 'projection', skips, 'test_dice')
    for other in (PLAIN, RESIDUAL):
      out[f'test Dice, projection - {other}, {skips} skips'] = stats.paired_difference(
        projection, arm('primary', other, skips, 'test_dice')
      )
    out[f'test Dice, identity - plain under lecun-none, {skips} skips'] = stats.paired_difference(
      arm('secondary', RESIDUAL, skips, 'test_dice', 'lecun-none'),
      arm('secondary', PLAIN, skips, 'test_dice', 'lecun-none'),
    )
  for tolerance in OTHER_TOLERANCES:
    estimate, se, df = edge_regression(rows, data, f'boundary_f1_{tolerance}px')
    out[f'boundary F1 {tolerance} px at equal Dice (coefficient of residual), all skips'] = decision.Endpoint(
      '', estimate, se, df, DELTAS[3]
    ).interval()
  keys = ['band_error', 'interior_error', *sorted({k for row in rows for k in row if k.startswith('recall_width_')})]
  for skips in SKIPS:
    for key in keys:
      out[f'{key}, identity - plain, {skips} skips'] = stats.t_interval(
        paired(rows, stage='primary', data=data, skips=skips, key=key)
      )
  blocks = sorted({k for row in rows for k in row if k.startswith('update/')})
  for key in blocks:
    out[f'log10 {key} (relative update size), identity / plain, no skips'] = stats.t_interval(
      paired(rows, stage='primary', data=data, skips='none', key=key, value=_log10)
    )
  return {name: interval for name, interval in out.items() if interval.n and math.isfinite(interval.mean)}


def _log10(value: float) -> float:
  return math.log10(value) if value > 0 else float('nan')


def depth_table(rows: Sequence[dict], data: str) -> list[str]:
  """Claim 4's runs: per depth, each block's width, parameters and mean test Dice without
  skips, and the gain (identity minus plain) with its t-interval over seeds."""
  levels: dict[int, dict] = {}
  for row in rows:
    if row['data'] != data or row['skips'] != 'none' or row['stage'] not in ('primary', 'depth'):
      continue
    if row['block'] in (PLAIN, RESIDUAL):
      levels.setdefault(row['depth'], {}).setdefault(row['block'], []).append(row)
  if len(levels) < 2:
    return []
  gains = depth_gains(rows, data)
  body = []
  for depth in sorted(levels):
    cells = [str(depth)]
    for block in (PLAIN, RESIDUAL):
      members = levels[depth].get(block, [])
      params = f'{members[0]["params"]:,}' if members and 'params' in members[0] else '-'
      width = str(members[0]['width']) if members else '-'
      cells += [width, params, stats.t_interval(row['test_dice'] for row in members).format(3)]
    cells.append(stats.t_interval(by[depth] for by in gains.values() if depth in by).format(3))
    body.append(cells)
  header = ['depth', 'plain width', 'plain params', 'plain test Dice', 'identity width', 'identity params',
            'identity test Dice', 'gain (identity - plain)']  # fmt: skip
  return _table(header, body)


def gradient_table(rows: Sequence[dict], data: str) -> list[str]:
  """Claim 2's absolute figures: per block, the mean log10 gradient RMS at initialisation of each
  primary block without skips under each recipe measured (stage 'initial', the primary seeds),
  and the mean log10 relative update size of the trained primary runs without skips."""
  tuning = tuning_seeds(rows)
  initial = [
    row
    for row in rows
    if (row['stage'], row['data'], row['skips']) == ('initial', data, 'none')
    and row['block'] in (PLAIN, RESIDUAL)
    and row['seed'] not in tuning
  ]
  trained = [row for row in rows if (row['stage'], row['data'], row['skips']) == ('primary', data, 'none')]
  blocks = sorted({key.split('/', 1)[1] for row in initial for key in row if key.startswith('grad_rms/')})
  if not blocks:
    return []
  columns = [(f'{block} {recipe} grad', 'grad_rms/', block, recipe, initial) for block, recipe in
             dict.fromkeys((row['block'], row['recipe']) for row in initial)]  # fmt: skip
  columns += [(f'{block} {row_recipe} update', 'update/', block, row_recipe, trained) for block, row_recipe in
              dict.fromkeys((row['block'], row['recipe']) for row in trained)]  # fmt: skip
  body = []
  for name in blocks:
    cells = [f'`{name}`']
    for _, prefix, block, recipe, source in columns:
      values = [
        _log10(row[prefix + name])
        for row in source
        if (row['block'], row['recipe']) == (block, recipe) and prefix + name in row
      ]
      finite = [v for v in values if math.isfinite(v)]
      cells.append(_fmt(float(np.mean(finite)), 2) if finite else 'n/a')
    body.append(cells)
  return _table(['block', *(label for label, *_ in columns)], body)


def validity_line(rows: Sequence[dict], data: str) -> str:
  """Claim 2's validity check as numbers: each no-skip tuning arm's measure, failed or trained."""
  check = validity(rows, data)
  failed = ', '.join(f'{arm} {value:+.2f}' for arm, value in check.failed.items()) or 'none'
  trained = ', '.join(f'{arm} {value:+.2f}' for arm, value in check.trained.items()) or 'none'
  verdict = 'passes' if check.valid else 'fails'
  return (
    f"Claim 2's validity check on {short(data)} {verdict}: the measure (log10 gradient RMS enc_0 / dec_0 at "
    f'initialisation, tuning seed) of the arms that failed to train: {failed}; of those that trained: {trained}.'
  )


def boundary_lines(rows: Sequence[dict]) -> list[str]:
  """Claim 3's boundary class (PROTOCOL.md amendment 6, stage 'boundary'): each primary
  all-skip arm's mean test Dice per class on the three-class data, and identity minus plain
  per class, paired by seed (no verdict)."""
  picked = [row for row in rows if row['stage'] == 'boundary']
  classes = sorted({key for row in picked for key in row if key.startswith('class_dice_')})
  if not picked or not classes:
    return []
  data = picked[0]['data']
  body = []
  for key in classes:
    by = {
      block: _by_seed(rows, stage='boundary', data=data, block=block, skips='all', key=key)
      for block in (PLAIN, RESIDUAL)
    }
    body.append(
      [
        key.removeprefix('class_dice_'),
        *(stats.t_interval(by[block].values()).format(3) for block in (PLAIN, RESIDUAL)),
        stats.paired_difference(by[RESIDUAL], by[PLAIN]).format(3),
      ]
    )
  return [
    f'Claim 3, the boundary class (PROTOCOL.md amendment 6): `{data}`, the primary arms with all skips at '
    "the cells' chosen recipes and rates, test Dice per class (2: cell boundary; 95% t-intervals over seeds):",
    '',
    *_table(['class', 'plain', 'identity', 'identity - plain'], body),
    '',
  ]


def secondary_lines(rows: Sequence[dict]) -> list[str]:
  """The report's secondary section: per dataset the arms at B, the depth table and the
  secondary effects (no verdicts), with claim 2's validity check."""
  lines = []
  for data in datasets(rows):
    name = short(data)
    lines += [validity_line(rows, data), '']
    table = arm_table(rows, data)
    if table:
      lines += [
        f'Arms trained at B on {name} (seeds pooled; failures counted, PROTOCOL.md amendment 5):',
        '',
        *table,
        '',
      ]
    table = gradient_table(rows, data)
    if table:
      lines += [
        f'Claim 2 on {name} without skips, per block: mean log10 gradient RMS at initialisation (first batch, '
        'primary seeds) and mean log10 relative update size |final - initial| / |initial| of the trained runs:',
        '',
        *table,
        '',
      ]
    table = depth_table(rows, data)
    if table:
      lines += [f'Depth without skips on {name} (claim 4; depth 4 from the primary stage):', '', *table, '']
    effects = secondary_effects(rows, data)
    if effects:
      body = [[label, interval.format(3)] for label, interval in effects.items()]
      lines += [
        f'Secondary effects on {name} (95% t-intervals over seeds; no verdicts):',
        '',
        *_table(['comparison', 'effect [95% CI] (n)'], body),
        '',
      ]
  return lines + boundary_lines(rows)
