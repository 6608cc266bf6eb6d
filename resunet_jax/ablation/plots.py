"""The figures of a sweep report: learning curves, metric intervals, gradient flow, knock-outs.

Each takes the studies of `report.group` (study name -> `report.Arm`s).
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use('Agg')  # Files only: no display on servers and CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from resunet_jax.ablation import analysis, stats  # noqa: E402


def _panels(count: int, columns: int, size=(5.0, 3.6), sharey: bool = False):
  rows = max(1, -(-count // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False, sharey=sharey)
  for axis in axes.flat[count:]:
    axis.set_axis_off()
  return fig, axes.flat


def _save(fig, path: pathlib.Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def learning_curves(studies: dict[str, list], path: pathlib.Path) -> None:
  """Validation Dice against steps: the mean over seeds per arm, the seeds' range shaded."""
  fig, axes = _panels(len(studies), min(2, len(studies)))
  for axis, (name, arms) in zip(axes, studies.items(), strict=False):
    variants = list(dict.fromkeys((arm.skips, arm.depth) for arm in arms))  # one colour each; plain dashed
    for arm in arms:
      colour = plt.cm.tab10(variants.index((arm.skips, arm.depth)) % 10)
      curves = [r.curve for r in arm.results.values()]
      length = min(len(c) for c in curves)
      steps = [s for s, _ in curves[0][:length]]
      values = np.array([[v for _, v in c[:length]] for c in curves])
      axis.plot(steps, values.mean(0), label=arm.name, color=colour, linestyle='-' if arm.residual else '--')
      axis.fill_between(steps, values.min(0), values.max(0), alpha=0.12, color=colour)
    axis.set(title=name, xlabel='step', ylabel='validation Dice', ylim=(0, 1))
    axis.legend(fontsize=7, ncol=2)
  _save(fig, path)


def metric_intervals(studies: dict[str, list], target: float, path: pathlib.Path) -> None:
  """Test Dice and boundary F1 per arm: the mean over seeds with its 95% t-interval."""
  fig, axes = _panels(2 * len(studies), 2, size=(5.0, 0.35 * max(len(a) for a in studies.values()) + 1.2))
  axes = list(axes)
  for row, (name, arms) in enumerate(studies.items()):
    for column, key in enumerate(('dice', 'boundary_f1')):
      axis = axes[2 * row + column]
      intervals = [stats.t_interval(arm.values(key, target).values()) for arm in arms]
      means = [i.mean for i in intervals]
      errors = [0 if i.n < 2 else i.half_width for i in intervals]
      colours = ['tab:blue' if arm.residual else 'tab:orange' for arm in arms]
      axis.barh(range(len(arms)), means, xerr=errors, color=colours, capsize=3)
      axis.set_yticks(range(len(arms)), [arm.name for arm in arms], fontsize=7)
      axis.invert_yaxis()
      low = min(m - e for m, e in zip(means, errors, strict=True))
      axis.set(title=f'{name}: test {key} (95% CI)', xlim=(max(0.0, low - 0.05), 1.0))
  _save(fig, path)


def gradient_norms(studies: dict[str, list], path: pathlib.Path) -> None:
  """Per-parameter gradient RMS of every block over training, for the arms with all skips."""
  arms = [arm for arms in studies.values() for arm in arms if '0' not in arm.skips]
  fig, axes = _panels(len(arms), 2, sharey=True)  # one scale: plain and residual side by side
  for axis, arm in zip(axes, arms, strict=False):
    names = arm.block_names()
    colours = plt.cm.viridis(np.linspace(0, 1, len(names)))
    results = list(arm.results.values())
    counts = results[0].param_counts
    length = min(len(r.gradients) for r in results)
    steps = [g['step'] for g in results[0].gradients[:length]]
    for colour, block in zip(colours, names, strict=True):
      rms = [[stats.gradient_rms(g, block, counts) for g in r.gradients[:length]] for r in results]
      axis.plot(steps, np.exp(np.mean(np.log(np.maximum(rms, 1e-30)), 0)), color=colour, label=block)
    axis.set(title=f'{arm.study}: {arm.name}', xlabel='step', ylabel='gradient RMS per parameter', yscale='log')
    axis.legend(fontsize=6, ncol=2)
  _save(fig, path)


def gradient_profile(studies: dict[str, list], path: pathlib.Path) -> None:
  """Per-parameter gradient RMS of each block, geometric mean over training and seeds, every arm."""
  fig, axes = _panels(len(studies), min(2, len(studies)))
  for axis, (name, arms) in zip(axes, studies.items(), strict=False):
    variants = list(dict.fromkeys((arm.skips, arm.depth) for arm in arms))
    deepest = max(arms, key=lambda arm: arm.depth)
    for arm in arms:
      names = arm.block_names()
      results = list(arm.results.values())
      counts = results[0].param_counts
      profile = [
        np.exp(np.mean([np.log(max(stats.gradient_rms(g, b, counts), 1e-30)) for r in results for g in r.gradients]))
        for b in names
      ]
      # Blocks sit at their distance from the bottleneck, so different depths line up there.
      offset = deepest.depth - arm.depth
      colour = plt.cm.tab10(variants.index((arm.skips, arm.depth)) % 10)
      axis.plot(
        np.arange(len(names)) + offset,
        profile,
        marker='o',
        markersize=3,
        color=colour,
        label=arm.name,
        linestyle='-' if arm.residual else '--',
      )
    labels = max((arm.block_names() for arm in arms), key=len)
    axis.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    axis.set(title=f'{name}: gradient RMS per parameter, mean over training', yscale='log')
    axis.legend(fontsize=6, ncol=2)
  _save(fig, path)


def knockout_heatmap(studies: dict[str, list], path: pathlib.Path) -> None:
  """Test Dice of every skip mask (columns, level 0 first) of every arm with all skips (rows)."""
  groups = {}
  for name, arms in studies.items():
    for arm in arms:
      labels, dice = arm.knockout_means('skip')
      if labels and '0' not in arm.skips:
        groups.setdefault((name, arm.depth), []).append((arm.name, labels, dice))
  fig, axes = _panels(
    max(len(groups), 1),
    1,
    size=(min(16.0, max(6.0, 1.0 + 0.5 * max((len(g[0][1]) for g in groups.values()), default=4))), 2.5),
  )
  for axis, ((name, depth), rows) in zip(axes, groups.items(), strict=False):
    matrix = np.array([dice for _, _, dice in rows])
    image = axis.imshow(matrix, vmin=0, vmax=max(float(matrix.max()), 1e-6), cmap='magma', aspect='auto')
    axis.set_xticks(range(matrix.shape[1]), rows[0][1], rotation=90, fontsize=7)
    axis.set_yticks(range(len(rows)), [arm for arm, _, _ in rows], fontsize=7)
    axis.set(title=f'{name}, depth {depth}: test Dice by kept skips (1 = kept, level 0 first)')
    fig.colorbar(image, ax=axis)
  _save(fig, path)


def write_all(studies: dict[str, list], target: float, directory: pathlib.Path) -> list[str]:
  """Writes every figure into `directory`; returns their file names."""
  figures = {
    'learning_curves.png': lambda p: learning_curves(studies, p),
    'metrics_ci.png': lambda p: metric_intervals(studies, target, p),
    'gradient_norms.png': lambda p: gradient_norms(studies, p),
    'gradient_profile.png': lambda p: gradient_profile(studies, p),
    'knockout_heatmap.png': lambda p: knockout_heatmap(studies, p),
  }
  for name, draw in figures.items():
    draw(directory / name)
  return list(figures)


# ---- the pre-registered study's figures (from its results.csv rows, `analysis`) ----


def robustness(rows, path: pathlib.Path) -> None:
  """The tuning stage per dataset and arm: final validation Dice against the peak learning rate,
  a line per recipe; dotted: the constant all-background prediction plus the failure margin."""
  tune = [row for row in rows if row['stage'] == 'tune']
  data = analysis.datasets(tune)
  arms = list(dict.fromkeys(row['arm'] for row in tune))
  recipes = list(dict.fromkeys(row['recipe'] for row in tune))
  fig, axes = _panels(len(data) * len(arms), len(arms), size=(2.6, 2.3), sharey=True)
  for axis, (name, arm) in zip(axes, [(d, a) for d in data for a in arms], strict=False):
    picked = [row for row in tune if (row['data'], row['arm']) == (name, arm)]
    for index, recipe in enumerate(recipes):
      points = sorted((row['learning_rate'], row['val_dice']) for row in picked if row['recipe'] == recipe)
      if points:
        axis.plot(*zip(*points, strict=True), marker='o', markersize=3, color=plt.cm.tab10(index), label=recipe)
    if picked:
      axis.axhline(picked[0].get('constant_val_dice', 0.0) + 0.05, color='grey', linestyle=':', linewidth=1)
    axis.set_xscale('log')
    rates = sorted({row['learning_rate'] for row in picked})
    axis.set_xticks(rates, [f'{rate:g}' for rate in rates])
    axis.minorticks_off()
    axis.set_title(f'{analysis.short(name)} {arm}', fontsize=8)
    axis.set_xlabel('peak learning rate', fontsize=7)
    axis.tick_params(labelsize=6)
  axes[0].set_ylabel('final validation Dice', fontsize=7)
  axes[0].legend(fontsize=6)
  _save(fig, path)


def primary_runs(rows, path: pathlib.Path) -> None:
  """Test Dice of every primary run (a dot per seed) with the arm's mean and 95% t-interval."""
  primary = [row for row in rows if row['stage'] == 'primary']
  data = analysis.datasets(primary)
  fig, axes = _panels(max(len(data), 1), max(len(data), 1), size=(4.5, 3.0))
  for axis, name in zip(axes, data, strict=False):
    arms = list(dict.fromkeys(row['arm'] for row in primary if row['data'] == name))
    for x, arm in enumerate(arms):
      values = [row['test_dice'] for row in primary if (row['data'], row['arm']) == (name, arm)]
      interval = stats.t_interval(values)
      axis.scatter(np.full(len(values), x) + np.linspace(-0.15, 0.15, len(values)), values, s=8, alpha=0.6)
      if interval.n > 1:
        axis.errorbar(x + 0.3, interval.mean, yerr=interval.half_width, fmt='ks', markersize=3, capsize=3)
    axis.set_xticks(range(len(arms)), arms, fontsize=7)
    title = f'{analysis.short(name)}: primary runs, {_steps(primary, name)} steps'
    axis.set(title=title, ylabel='test Dice', ylim=(0, 1))
  _save(fig, path)


def depth_gain(rows, path: pathlib.Path) -> None:
  """Claim 4: the test-Dice gain (identity minus plain, no skips) against depth, a grey line per
  seed, the mean with its 95% t-interval."""
  data = [
    d
    for d in analysis.datasets(rows)
    if len({depth for by in analysis.depth_gains(rows, d).values() for depth in by}) > 1
  ]
  fig, axes = _panels(max(len(data), 1), max(len(data), 1), size=(4.5, 3.0))
  for axis, name in zip(axes, data, strict=False):
    gains = analysis.depth_gains(rows, name)
    depths = sorted({depth for by in gains.values() for depth in by})
    for by in gains.values():
      axis.plot(sorted(by), [by[d] for d in sorted(by)], color='grey', alpha=0.4, linewidth=1)
    intervals = [stats.t_interval(by[d] for by in gains.values() if d in by) for d in depths]
    axis.errorbar(depths, [i.mean for i in intervals], yerr=[i.half_width for i in intervals], fmt='ko-', capsize=3)
    axis.axhline(0, color='black', linewidth=0.5)
    title = f'{analysis.short(name)}: residual gain, no skips, {_steps(rows, name, "depth")} steps'
    axis.set(title=title, xlabel='depth', ylabel='test Dice gain')
    axis.set_xticks(depths)
  _save(fig, path)


def _steps(rows, data: str, stage: str | None = None) -> str:
  """The training budget(s) of a dataset's rows (of one stage), for a title."""
  return '/'.join(
    str(s) for s in sorted({row['steps'] for row in rows if row['data'] == data and stage in (None, row['stage'])})
  )


STUDY_FIGURES = {'robustness.png': robustness, 'primary_runs.png': primary_runs, 'depth_gain.png': depth_gain}
# PROTOCOL.md amendment 8: the verdict stages' figures again, from the plateau stages' rows
PLATEAU_FIGURES = {'primary_runs_plateau.png': primary_runs, 'depth_gain_plateau.png': depth_gain}


def study_figure_names(plateau: bool) -> list[str]:
  """The file names `study_figures` writes."""
  return [*STUDY_FIGURES, *(PLATEAU_FIGURES if plateau else ())]


def study_figures(rows, directory: pathlib.Path, *, plateau: bool = False) -> list[str]:
  """Writes the study's figures into `directory`; returns their file names. With `plateau`
  (both plateau stages complete) the primary runs and the depth gain are drawn again from the
  plateau stages' rows (`analysis.at_plateau`)."""
  for name, draw in STUDY_FIGURES.items():
    draw(rows, directory / name)
  if plateau:
    repeated = analysis.at_plateau(rows)
    for name, draw in PLATEAU_FIGURES.items():
      draw(repeated, directory / name)
  return study_figure_names(plateau)
