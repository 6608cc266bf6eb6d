"""The figures of a sweep report: learning curves, metric intervals, gradient flow, knock-outs.

Each takes the studies of `report.group` (study name -> `report.Arm`s).
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use('Agg')  # Files only: no display on servers and CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from resunet_jax.ablation import stats  # noqa: E402


def panels(count: int, columns: int, size=(5.0, 3.6), sharey: bool = False):
  """A figure of `count` axes in `columns` columns (`size` inches each), the unused ones hidden: (fig, axes)."""
  rows = max(1, -(-count // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False, sharey=sharey)
  for axis in axes.flat[count:]:
    axis.set_axis_off()
  return fig, axes.flat


def save(fig, path: pathlib.Path) -> None:
  """Writes `fig` to `path` (80 dpi) and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def learning_curves(studies: dict[str, list], path: pathlib.Path) -> None:
  """Validation Dice against steps: the mean over seeds per arm, the seeds' range shaded."""
  fig, axes = panels(len(studies), min(2, len(studies)))
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
  save(fig, path)


def metric_intervals(studies: dict[str, list], target: float, path: pathlib.Path) -> None:
  """Test Dice and boundary F1 per arm: the mean over seeds with its 95% t-interval."""
  fig, axes = panels(2 * len(studies), 2, size=(5.0, 0.35 * max(len(a) for a in studies.values()) + 1.2))
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
  save(fig, path)


def gradient_norms(studies: dict[str, list], path: pathlib.Path) -> None:
  """Per-parameter gradient RMS of every block over training, for the arms with all skips."""
  arms = [arm for arms in studies.values() for arm in arms if '0' not in arm.skips]
  fig, axes = panels(len(arms), 2, sharey=True)  # one scale: plain and residual side by side
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
  save(fig, path)


def gradient_profile(studies: dict[str, list], path: pathlib.Path) -> None:
  """Per-parameter gradient RMS of each block, geometric mean over training and seeds, every arm."""
  fig, axes = panels(len(studies), min(2, len(studies)))
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
  save(fig, path)


def knockout_heatmap(studies: dict[str, list], path: pathlib.Path) -> None:
  """Test Dice of every skip mask (columns, level 0 first) of every arm with all skips (rows)."""
  groups = {}
  for name, arms in studies.items():
    for arm in arms:
      labels, dice = arm.knockout_means('skip')
      if labels and '0' not in arm.skips:
        groups.setdefault((name, arm.depth), []).append((arm.name, labels, dice))
  fig, axes = panels(
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
  save(fig, path)


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
