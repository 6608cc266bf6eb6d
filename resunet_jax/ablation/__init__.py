"""Ablation experiments on the skip and residual paths: the general tools every study uses.

- `grid`: ablations as pure config transforms (`ablate`) and the runs an ablation config
  describes (`run_specs`).
- `runner`: one experiment as a function, `run(config, root) -> Result`, knock-outs of a
  trained model, and `sweep`, a resumable map over the grid.
- `stats`: t-intervals over seeds, paired differences, convergence and gradient-flow figures.
- `decision`: the one verdict rule (one-sided and TOST paired t-tests, Holm, four words) and
  the power calculation.
- `report`, `plots`: a sweep's `results.csv`, `knockouts.csv`, `report.md` and figures.

A pre-registered study is a folder of its own under `studies/` (its protocol, config, analysis
and committed results) built on these; nothing here imports one.
"""

from resunet_jax.ablation import decision, grid, plots, report, runner, stats
from resunet_jax.ablation.grid import RunSpec, ablate, run_specs, section, study
from resunet_jax.ablation.runner import Result, residual_masks, run, skip_masks, sweep

__all__ = [
  'Result',
  'RunSpec',
  'ablate',
  'decision',
  'grid',
  'plots',
  'report',
  'residual_masks',
  'run',
  'run_specs',
  'runner',
  'section',
  'skip_masks',
  'stats',
  'study',
  'sweep',
]
