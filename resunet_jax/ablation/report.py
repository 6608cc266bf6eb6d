"""A sweep's results as tables and a report: `results.csv`, `knockouts.csv` and `report.md`.

Every number in the report is a mean over seeds with its 95% t-interval, or a difference
paired by seed with its interval (`stats`). Each of the design note's four claims about
residual connections gets a verdict that quotes its numbers: 'supported' when the interval of
the residual-minus-plain difference lies wholly on the claimed side of zero, 'not supported'
when it lies wholly on the other side, 'inconclusive at this budget' when it spans zero.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from resunet_jax import evaluation, models
from resunet_jax.ablation import decision, plots, stats
from resunet_jax.ablation.grid import RunSpec, variant_name
from resunet_jax.ablation.runner import Result

CLAIMS = (
  'residual connections speed up convergence',
  'residual connections ease vanishing gradients',
  'residual connections sharpen edges and details',
  'residual connections allow deeper networks',
)
# How each claim is measured, and what the measure cannot tell apart.
MEASURES = (
  'the first validation step at which Dice reaches the target, residual against plain with all skips, '
  'paired by seed; and the area under the validation-Dice curve',
  "the bottleneck's gradient share (log10 of its per-parameter gradient RMS over the whole network's), "
  'with all skips. With long skips the decoder can bypass the bottleneck, so a small share can mean '
  'bypassed as well as vanished (Drozdzal et al. 2016 saw deep layers barely update with long skips '
  'only); the study tables give the share of the no-skip arms too',
  'boundary F1 (higher is better) and HD95 (lower). Both improve with overall accuracy, so the Dice '
  'difference is quoted beside them: an edge gain well above the Dice gain would point at sharper edges '
  'as such',
  'the Dice difference (residual minus plain, all skips) at each depth of a depth sweep; supported when it '
  'is positive at the deepest depth and its increase from the shallowest depth, paired by seed, is positive',
)
_LABELS = {
  'dice': 'Dice',
  'iou': 'IoU',
  'boundary_f1': 'boundary F1',
  'hd95': 'HD95 (px)',
  'steps_to_target': 'steps to target',
  'auc': 'val Dice AUC',
  'grad_share': 'bottleneck grad share',
}


def run_scores(result: Result, target: float) -> dict[str, float | None]:
  """The scalars of one run the report compares: test metrics, convergence, gradient flow.

  `steps_to_target` is None when the validation Dice never reached `target`; `grad_share` is
  `stats.gradient_share` of the bottleneck (log10 of its per-parameter gradient RMS relative
  to the whole network's).
  """
  scores: dict[str, float | None] = {name: result.test[name] for name in evaluation.METRICS}
  scores['steps_to_target'] = stats.steps_to_target(result.curve, target)
  scores['auc'] = stats.area_under_curve(result.curve, result.num_steps)
  scores['grad_share'] = stats.gradient_share(result.gradients, 'bottleneck', result.param_counts)
  return scores


@dataclasses.dataclass
class Arm:
  """The runs of one arm of one study, by seed."""

  study: str
  name: str
  residual: bool
  skips: str
  depth: int
  results: dict[int, Result]
  skip_kind: str = 'concat'
  deep_supervision: bool = False

  @property
  def variant(self) -> str:
    """`RunSpec.variant`: the skip kind and deep supervision as arm names end, '' for concat."""
    return variant_name(self.skip_kind, self.deep_supervision)

  def block_names(self) -> tuple[str, ...]:
    """`models.block_names` of the arm's network."""
    return models.block_names(models.ModelConfig(depth=self.depth, skip_kind=self.skip_kind))

  def values(self, key: str, target: float, *, censor: bool = False) -> dict[int, float]:
    """`{seed: score}`; with `censor`, a target never reached counts as the whole budget."""
    out = {}
    for seed, result in self.results.items():
      value = run_scores(result, target)[key]
      if value is None and censor:
        value = float(result.num_steps)
      if value is not None:
        out[seed] = float(value)
    return out

  def knockout_means(self, kind: str) -> tuple[list[str], np.ndarray]:
    """Labels and mean test Dice over seeds of the `kind` ('skip' | 'residual') knock-outs."""
    tables = [r.knockouts[kind] for r in self.results.values() if kind in r.knockouts]
    if not tables:
      return [], np.zeros(0)
    return tables[0]['labels'], np.mean([t['dice'] for t in tables], axis=0)


def group(pairs: Sequence[tuple[RunSpec, Result]]) -> dict[str, list[Arm]]:
  """Study name -> its arms, in grid order."""
  studies: dict[str, dict[str, Arm]] = {}
  for spec, result in pairs:
    arms = studies.setdefault(spec.study, {})
    arm = arms.setdefault(
      spec.arm,
      Arm(spec.study, spec.arm, spec.residual, spec.skips, spec.depth, {}, spec.skip_kind, spec.deep_supervision),
    )
    arm.results[spec.seed] = result
  return {name: list(arms.values()) for name, arms in studies.items()}


def _find(arms: Sequence[Arm], *, residual: bool, skips: str, depth: int, variant: str = '') -> Arm | None:
  for arm in arms:
    if (arm.residual, arm.skips, arm.depth, arm.variant) == (residual, skips, depth, variant):
      return arm
  return None


def _full_pairs(arms: Sequence[Arm], variant: str | None = None) -> list[tuple[int, Arm, Arm]]:
  """`(depth, plain arm, residual arm)` with all skips, at every depth and skip variant (or
  `variant` alone) that has both."""
  pairs = []
  variants = dict.fromkeys(a.variant for a in arms) if variant is None else (variant,)
  for depth, kind in itertools.product(sorted({a.depth for a in arms}), variants):
    plain = _find(arms, residual=False, skips='1' * depth, depth=depth, variant=kind)
    residual = _find(arms, residual=True, skips='1' * depth, depth=depth, variant=kind)
    if plain and residual:
      pairs.append((depth, plain, residual))
  return pairs


def result_rows(pairs: Sequence[tuple[RunSpec, Result]], target: float) -> list[dict]:
  """One row per run: its arm, settings, test metrics, convergence and gradient figures."""
  rows = []
  for spec, result in pairs:
    row = {
      'study': spec.study,
      'arm': spec.arm,
      'seed': spec.seed,
      'data': result.data,
      'residual': int(result.residual),
      'skips': result.skips,
      'depth': result.depth,
      'num_steps': result.num_steps,
      'run_id': result.run_id,
    }
    row.update({key: '' if value is None else value for key, value in run_scores(result, target).items()})
    row['wall_s'] = round(result.wall_s, 1)
    rows.append(row)
  return rows


def knockout_rows(pairs: Sequence[tuple[RunSpec, Result]]) -> list[dict]:
  """One row per run and knock-out: `kind` 'skip' (a mask, level 0 first) or 'residual'."""
  rows = []
  for spec, result in pairs:
    for kind, table in result.knockouts.items():
      for label, dice in zip(table['labels'], table['dice'], strict=True):
        rows.append(
          {'study': spec.study, 'arm': spec.arm, 'seed': spec.seed, 'kind': kind, 'knockout': label, 'dice': dice}
        )
  return rows


def write_csv(rows: Sequence[dict], path: pathlib.Path) -> None:
  with path.open('w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)


def _verdict(interval: stats.Interval, claimed_sign: int) -> str:
  side = interval.excludes_zero()
  if side == claimed_sign:
    return 'supported'
  if side == -claimed_sign:
    return 'not supported'
  return 'inconclusive at this budget'


def claim_verdicts(studies: dict[str, list[Arm]], target: float) -> list[str]:
  """One line per claim and study that can test it, with the numbers it rests on."""
  lines = []
  pairs = []  # (label, plain arm, residual arm) with all skips, at each depth
  for name, arms in studies.items():
    several = len({a.depth for a in arms}) > 1
    for depth, plain, residual in _full_pairs(arms):
      label = f'{name}, depth {depth}' if several else name
      pairs.append((f'{label}, {plain.variant} skips' if plain.variant else label, plain, residual))
  if not pairs:
    return [
      f'{i}. {claim}: not tested (no study has plain and residual arms with all skips)'
      for i, claim in enumerate(CLAIMS, 1)
    ]

  def diff(key, a, b, censor=False):
    return stats.paired_difference(a.values(key, target, censor=censor), b.values(key, target, censor=censor))

  per_claim: list[list[str]] = [[], [], []]
  for label, plain, residual in pairs:
    steps = diff('steps_to_target', plain, residual, censor=True)  # plain - residual: > 0 is faster
    reached = len(residual.values('steps_to_target', target)), len(plain.values('steps_to_target', target))
    verdict = _verdict(steps, +1)
    if verdict == 'supported' and reached[0] < len(residual.results):
      verdict = 'inconclusive at this budget'  # a censored residual run understates its steps
    auc = diff('auc', residual, plain)
    censored = reached != (len(residual.results), len(plain.results))
    per_claim[0].append(
      f'{label}: {verdict} — residual reaches validation Dice {target:g} {steps.format(0)} steps sooner '
      f'(plain minus residual; reached by {reached[0]}/{len(residual.results)} residual and '
      f'{reached[1]}/{len(plain.results)} plain runs{", the others counted at the budget" if censored else ""}); '
      f'validation-Dice AUC difference {auc.format()}'
    )
    share = diff('grad_share', residual, plain)
    shares = [stats.t_interval(arm.values('grad_share', target).values()).format(2) for arm in (residual, plain)]
    per_claim[1].append(
      f'{label}: {_verdict(share, +1)} — bottleneck gradient share (log10 of its per-parameter gradient '
      f"RMS over the network's) {shares[0]} residual vs {shares[1]} plain; difference {share.format(2)}"
    )
    f1, hd = diff('boundary_f1', residual, plain), diff('hd95', residual, plain)
    per_claim[2].append(
      f'{label}: {_verdict(f1, +1)} — boundary F1 difference (residual minus plain) {f1.format()}; '
      f'HD95 difference {hd.format(2)} px; Dice difference {diff("dice", residual, plain).format()}'
    )
  for index, found in enumerate([*per_claim, _depth_verdicts(studies, target)]):
    lines += [f'{index + 1}. **{CLAIMS[index]}**. Measured by {MEASURES[index]}.']
    lines += [f'   - {line}' for line in found]
  return lines


# docs/ablation/SKIPS_PROTOCOL.md: (name, (residual, variant) of the arm, of the arm it is compared with)
SKIP_ENDPOINTS = (
  ('A1: plain attention - plain concat', (False, 'attention'), (False, '')),
  ('A2: residual attention - residual concat', (True, 'attention'), (True, '')),
  ('N1: plain nested - plain concat', (False, 'nested'), (False, '')),
  ('N2: residual nested - residual concat', (True, 'nested'), (True, '')),
  ('R1: residual concat - plain concat', (True, ''), (False, '')),
  ('R2: residual attention - plain attention', (True, 'attention'), (False, 'attention')),
  ('R3: residual nested - plain nested', (True, 'nested'), (False, 'nested')),
)
SKIP_DELTA = 0.02  # Dice: the equivalence margin of SKIPS_PROTOCOL.md


def skip_path_decisions(arms: Sequence[Arm]) -> list[decision.Decision]:
  """The verdicts of SKIPS_PROTOCOL.md's endpoints over one study's arms with every skip: each a
  per-seed paired difference of test Dice, Holm-corrected over the endpoints the study has. Empty
  unless it has both a concat and another skip kind, each with every seed of the others."""
  full = {(a.residual, a.variant): a for a in arms if a.skips == '1' * a.depth}
  if '' not in {variant for _, variant in full} or len({variant for _, variant in full}) < 2:
    return []
  if len({frozenset(a.results) for a in full.values()}) != 1:
    return []  # the stopping rule: verdicts only once every arm has all its seeds
  endpoints = [
    decision.Endpoint.paired(
      name,
      [full[arm].results[s].test['dice'] - full[other].results[s].test['dice'] for s in sorted(full[arm].results)],
      SKIP_DELTA,
    )
    for name, arm, other in SKIP_ENDPOINTS
    if arm in full and other in full
  ]
  return decision.decide(endpoints) if endpoints else []


def skip_path_section(studies: dict[str, list[Arm]]) -> list[str]:
  """The report's table of `skip_path_decisions`, per study that has them."""
  lines = []
  for name, arms in studies.items():
    decisions = skip_path_decisions(arms)
    if not decisions:
      continue
    rows = [
      [
        d.endpoint.name,
        d.effect.format(),
        f'{d.p_claim:.3g}',
        f'{d.p_opposite:.3g}',
        f'{d.p_equivalence:.3g}',
        f'**{d.label}**',
      ]
      for d in decisions
    ]
    lines += [
      f'## Skip paths in study `{name}` (pre-registered: docs/ablation/SKIPS_PROTOCOL.md)',
      '',
      'Test Dice differences paired by seed [95% t-interval]; one-sided p-values Holm-adjusted over '
      f'the {len(decisions)} endpoints; equivalence margin {SKIP_DELTA:g}.',
      '',
      *_table(['endpoint', 'effect', 'p claim', 'p opposite', 'p equivalence', 'verdict'], rows),
      '',
    ]
  return lines


def _depth_verdicts(studies: dict[str, list[Arm]], target: float) -> list[str]:
  lines = []
  for name, arms in studies.items():
    for variant in dict.fromkeys(a.variant for a in arms):
      gaps = []  # (depth, {seed: residual Dice - plain Dice})
      for depth, plain, residual in _full_pairs(arms, variant):
        dice_r, dice_p = residual.values('dice', target), plain.values('dice', target)
        gaps.append((depth, {s: dice_r[s] - dice_p[s] for s in dice_r.keys() & dice_p.keys()}))
      if len(gaps) < 2:
        continue
      (shallow, first), (deep, last) = gaps[0], gaps[-1]
      # The claim is an interaction: the residual gain grows with depth. Seeds are the blocks: seed s
      # fixes the data order at every depth, so the per-seed change of the gain is paired.
      widening = stats.paired_difference(last, first)
      verdict = _verdict(stats.t_interval(last.values()), +1)
      if verdict == 'supported':
        verdict = _verdict(widening, +1)
      table = '; '.join(f'depth {d}: {stats.t_interval(g.values()).format()}' for d, g in gaps)
      label = f'{name}, {variant} skips' if variant else name
      lines.append(
        f'{label}: {verdict} — Dice difference (residual minus plain) by depth: {table}; '
        f'its change from depth {shallow} to {deep}: {widening.format()}'
      )
  return lines or ['not tested in this grid: run the depth sweep, --config=experiments/configs/ablate_depth.py']


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header), *('| ' + ' | '.join(r) + ' |' for r in rows)]


def _study_section(name: str, arms: Sequence[Arm], target: float) -> list[str]:
  first = next(iter(arms[0].results.values()))
  lines = [f'## Study `{name}`: {first.data}, {first.num_steps} steps per run', '']
  keys = ('dice', 'iou', 'boundary_f1', 'hd95', 'auc', 'grad_share')
  rows = []
  for arm in arms:
    reached = arm.values('steps_to_target', target)
    steps = (
      f'{int(np.median(list(reached.values())))} ({len(reached)}/{len(arm.results)})'
      if reached
      else f'— (0/{len(arm.results)})'
    )
    cells = [
      stats.t_interval(arm.values(k, target).values()).format(2 if k in ('hd95', 'grad_share') else 3) for k in keys
    ]
    rows.append([f'`{arm.name}`', arm.skips, str(len(arm.results)), *cells[:4], steps, *cells[4:]])
  header = [
    'arm',
    'skips',
    'seeds',
    *(_LABELS[k] for k in keys[:4]),
    f'steps to Dice {target:g} (median, reached)',
    *(_LABELS[k] for k in keys[4:]),
  ]
  lines += _table(header, rows) + ['']

  compared = [
    (a, _find(arms, residual=a.residual, skips='1' * a.depth, depth=a.depth, variant=a.variant)) for a in arms
  ]
  compared = [(a, full) for a, full in compared if full is not None and full is not a]
  if compared:
    lines += [
      'Paired differences against the full model (same residual setting and depth, all skips), arm minus full:',
      '',
    ]
    metrics = ('dice', 'iou', 'boundary_f1', 'hd95')
    rows = [
      [
        f'`{a.name}`',
        f'`{full.name}`',
        *(stats.paired_difference(a.values(k, target), full.values(k, target)).format() for k in metrics),
      ]
      for a, full in compared
    ]
    lines += _table(['arm', 'full model', *(f'Δ {_LABELS[k]}' for k in metrics)], rows) + ['']
  switched = [
    (a, _find(arms, residual=False, skips=a.skips, depth=a.depth, variant=a.variant)) for a in arms if a.residual
  ]
  switched = [(a, p) for a, p in switched if p is not None]
  if switched:
    lines += ['The residual switch, residual minus plain, paired by seed:', '']
    metrics = ('dice', 'boundary_f1', 'hd95', 'auc')
    rows = [
      [
        a.skips + (f' {a.variant}' if a.variant else ''),
        *(stats.paired_difference(a.values(k, target), p.values(k, target)).format() for k in metrics),
      ]
      for a, p in switched
    ]
    lines += _table(['skips', *(f'Δ {_LABELS[k]}' for k in metrics)], rows) + ['']
  lines += _knockout_section(arms)
  return lines


def _skip_knockout_row(arm: Arm) -> list[str] | None:
  """Test Dice of an arm with every skip: intact, the change with each one zeroed, with all
  zeroed, and the best of all masks (None for arms without every skip)."""
  labels, dice = arm.knockout_means('skip')
  if not labels or '0' in arm.skips:
    return None
  by_label = dict(zip(labels, dice, strict=True))
  depth = arm.depth
  full = by_label['1' * depth]
  singles = [by_label['1' * level + '0' + '1' * (depth - level - 1)] - full for level in range(depth)]
  best = int(np.argmax(dice))
  changes = [*singles, by_label['0' * depth] - full]
  return [f'`{arm.name}`', f'{full:.3f}', *(f'{d:+.3f}' for d in changes), f'{labels[best]} ({dice[best]:.3f})']


def _knockout_section(arms: Sequence[Arm]) -> list[str]:
  lines = []
  for depth in sorted({a.depth for a in arms}):
    at_depth = [a for a in arms if a.depth == depth]
    rows = [row for a in at_depth if (row := _skip_knockout_row(a))]
    if rows:
      lines += [
        'Skip knock-outs at apply time (test Dice, mean over seeds, of the trained model intact, and its change '
        'when skip tensors are zeroed; masks list the levels, level 0 first, 1 = kept):',
        '',
        *_table(['arm', 'intact', *(f'−skip {level}' for level in range(depth)), '−all skips', 'best mask'], rows),
        '',
      ]
    titles = {
      'residual': "Residual knock-outs at apply time (test Dice change when a block's shortcut is zeroed):",
      'gate': 'Attention-gate knock-outs at apply time (test Dice change when a gate is opened to ones):',
      'prune': 'Pruned UNet++ at apply time (test Dice change when predicting with the sub-network of a depth):',
    }
    for kind, title in titles.items():
      tables: dict[tuple, list] = {}  # arms with the same knock-outs share a table
      for arm in at_depth:
        labels, dice = arm.knockout_means(kind)
        if labels:
          tables.setdefault(tuple(labels), []).append((arm, dice))
      for labels, found in tables.items():
        intact = len(labels) - 1 if kind == 'prune' else 0  # a UNet++'s whole network is its deepest level
        header = ['arm', 'intact', *(label.replace('-', '−') for i, label in enumerate(labels) if i != intact)]
        rows = [
          [
            f'`{a.name}`',
            f'{dice[intact]:.3f}',
            *(f'{d - dice[intact]:+.3f}' for i, d in enumerate(dice) if i != intact),
          ]
          for a, dice in found
        ]
        lines += [title, '', *_table(header, rows), '']
  return lines


def _platform() -> str:
  device, count = jax.devices()[0], jax.device_count()
  name = f'{device.platform} device' if device.device_kind == device.platform else device.device_kind
  return f'{count} {name}{"s" if count > 1 else ""}, {os.cpu_count()} CPU cores, jax {jax.__version__}'


def markdown(pairs: Sequence[tuple[RunSpec, Result]], *, target: float, command: str, figures: Sequence[str]) -> str:
  """The whole `report.md` of a sweep."""
  studies = group(pairs)
  seeds = sorted({spec.seed for spec, _ in pairs})
  lines = [
    '# Ablation of skip and residual paths',
    '',
    f'Command: `{command}`',
    '',
    f'{len(pairs)} runs ({sum(len(a) for a in studies.values())} arms x {len(seeds)} seeds) on {_platform()}; '
    f'the runs took {sum(r.wall_s for _, r in pairs) / 60:.1f} min of training and measurement in all.',
    'Test metrics are means of per-image values on the test split, for the final weights of each run '
    '(the same budget for every arm). Brackets are 95% t-intervals over seeds; differences are paired by '
    'seed. "Bottleneck grad share" is log10 of the per-parameter gradient RMS of the deepest block over '
    "the whole network's, averaged over logged steps (more negative: more vanishing).",
    '',
  ]
  registered = skip_path_section(studies)
  if registered:  # a pre-registered family: its verdicts alone carry verdict words (SKIPS_PROTOCOL.md)
    lines += registered
  else:
    lines += ["## Verdicts on the design note's claims", '', *claim_verdicts(studies, target), '']
  for name, arms in studies.items():
    lines += _study_section(name, arms, target)
  if figures:
    lines += ['## Figures', '', *(f'![{name}]({name})' for name in figures), '']
  return '\n'.join(lines)


def write(
  pairs: Sequence[tuple[RunSpec, Result]], directory: pathlib.Path, *, target: float, command: str
) -> dict[str, pathlib.Path]:
  """Writes `results.csv`, `knockouts.csv`, the figures and `report.md` into `directory`.

  Returns:
    Output name -> path.
  """
  directory = pathlib.Path(directory)
  paths = {
    'results': directory / 'results.csv',
    'knockouts': directory / 'knockouts.csv',
    'report': directory / 'report.md',
  }
  write_csv(result_rows(pairs, target), paths['results'])
  write_csv(knockout_rows(pairs), paths['knockouts'])
  figures = plots.write_all(group(pairs), target, directory)
  paths['report'].write_text(markdown(pairs, target=target, command=command, figures=figures))
  paths.update({name.removesuffix('.png'): directory / name for name in figures})
  return paths
