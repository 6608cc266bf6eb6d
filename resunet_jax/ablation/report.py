"""A sweep's results as tables and a report: `results.csv`, `knockouts.csv` and `report.md`.

Every number in the report is a mean over seeds with its 95% t-interval, or a difference
paired by seed with its interval (`stats`). The caller passes the verdict section
(`markdown(verdicts=...)`), built on `decision.decide`, the one rule of every report: a
pre-registered study's (studies/*), or the exploratory grid's verdicts on the design note's
claims (experiments/claims.py). `decision_table` renders a family of decisions.
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

from resunet_jax import models
from resunet_jax.ablation import decision, plots, stats
from resunet_jax.ablation.grid import RunSpec, variant_name
from resunet_jax.ablation.runner import Result
from resunet_jax.training import evaluation

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


def find_arm(arms: Sequence[Arm], *, residual: bool, skips: str, depth: int, variant: str = '') -> Arm | None:
  """The arm with these settings, or None."""
  for arm in arms:
    if (arm.residual, arm.skips, arm.depth, arm.variant) == (residual, skips, depth, variant):
      return arm
  return None


def full_pairs(arms: Sequence[Arm], variant: str | None = None) -> list[tuple[int, Arm, Arm]]:
  """`(depth, plain arm, residual arm)` with all skips, at every depth and skip variant (or
  `variant` alone) that has both."""
  pairs = []
  variants = dict.fromkeys(a.variant for a in arms) if variant is None else (variant,)
  for depth, kind in itertools.product(sorted({a.depth for a in arms}), variants):
    plain = find_arm(arms, residual=False, skips='1' * depth, depth=depth, variant=kind)
    residual = find_arm(arms, residual=True, skips='1' * depth, depth=depth, variant=kind)
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


def decision_table(decisions: Sequence[decision.Decision], *, check: bool = False) -> list[str]:
  """A family's decisions as a Markdown table: endpoint, effect [95% CI], the Holm-adjusted p-values, verdict.

  `check` adds the claim's Holm-adjusted p under the test that did not decide (`Decision.p_claim_other`)
  and names each column's test.
  """
  rows = [
    [
      d.endpoint.name,
      d.effect.format(),
      f'{d.p_claim:.3g}',
      *([f'{d.p_claim_other:.3g}'] if check else []),
      f'{d.p_opposite:.3g}',
      f'{d.p_equivalence:.3g}',
      f'**{d.label}**',
    ]
    for d in decisions
  ]
  if not check:
    return _table(['endpoint', 'effect', 'p claim', 'p opposite', 'p equivalence', 'verdict'], rows)
  test, other = ('sign flip', 't') if decisions and decisions[0].test == 'sign_flip' else ('t', 'sign flip')
  header = [f'p claim ({test})', f'p claim ({other})', f'p opposite ({test})', f'p equivalence ({test})']
  return _table(['endpoint', 'effect', *header, 'verdict'], rows)


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
    (a, find_arm(arms, residual=a.residual, skips='1' * a.depth, depth=a.depth, variant=a.variant)) for a in arms
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
    (a, find_arm(arms, residual=False, skips=a.skips, depth=a.depth, variant=a.variant)) for a in arms if a.residual
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


def markdown(
  pairs: Sequence[tuple[RunSpec, Result]],
  *,
  target: float,
  command: str,
  figures: Sequence[str],
  verdicts: Sequence[str] | None = None,
) -> str:
  """The whole `report.md` of a sweep.

  Args:
    verdicts: the sweep's verdict section (Markdown lines built on `decision`), placed before the
      studies' tables: a pre-registered study's, or the exploratory grid's (experiments/claims.py).
  """
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
  lines += list(verdicts or ())
  for name, arms in studies.items():
    lines += _study_section(name, arms, target)
  if figures:
    lines += ['## Figures', '', *(f'![{name}]({name})' for name in figures), '']
  return '\n'.join(lines)


def write(
  pairs: Sequence[tuple[RunSpec, Result]],
  directory: pathlib.Path,
  *,
  target: float,
  command: str,
  verdicts: Sequence[str] | None = None,
) -> dict[str, pathlib.Path]:
  """Writes `results.csv`, `knockouts.csv`, the figures and `report.md` (`markdown`) into `directory`.

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
  paths['report'].write_text(markdown(pairs, target=target, command=command, figures=figures, verdicts=verdicts))
  paths.update({name.removesuffix('.png'): directory / name for name in figures})
  return paths
