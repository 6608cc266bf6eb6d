"""The skip/residual study's figures, drawn from its results.csv rows (`analysis`)."""

from __future__ import annotations

import pathlib

import numpy as np

from resunet_jax.ablation import plots, stats
from studies.skip_residual import analysis

plt = plots.plt


def robustness(rows, path: pathlib.Path) -> None:
  """The tuning stage per dataset and arm: final validation Dice against the peak learning rate,
  a line per recipe; dotted: the constant all-background prediction plus the failure margin."""
  tune = [row for row in rows if row['stage'] == 'tune']
  data = analysis.datasets(tune)
  arms = list(dict.fromkeys(row['arm'] for row in tune))
  recipes = list(dict.fromkeys(row['recipe'] for row in tune))
  fig, axes = plots.panels(len(data) * len(arms), len(arms), size=(2.6, 2.3), sharey=True)
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
  plots.save(fig, path)


def primary_runs(rows, path: pathlib.Path) -> None:
  """Test Dice of every primary run (a dot per seed) with the arm's mean and 95% t-interval."""
  primary = [row for row in rows if row['stage'] == 'primary']
  data = analysis.datasets(primary)
  fig, axes = plots.panels(max(len(data), 1), max(len(data), 1), size=(4.5, 3.0))
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
  plots.save(fig, path)


def depth_gain(rows, path: pathlib.Path) -> None:
  """Claim 4: the test-Dice gain (identity minus plain, no skips) against depth, a grey line per
  seed, the mean with its 95% t-interval."""
  data = [
    d
    for d in analysis.datasets(rows)
    if len({depth for by in analysis.depth_gains(rows, d).values() for depth in by}) > 1
  ]
  fig, axes = plots.panels(max(len(data), 1), max(len(data), 1), size=(4.5, 3.0))
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
  plots.save(fig, path)


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
