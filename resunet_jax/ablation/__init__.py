"""Ablation experiments on the skip and residual paths.

- `grid`: ablations as pure config transforms (`ablate`) and the runs an ablation config
  describes (`run_specs`).
- `runner`: one experiment as a function, `run(config, root) -> Result`, knock-outs of a
  trained model, and `sweep`, a resumable map over the grid.
- `protocol`, `measures`: the pre-registered study (docs/ablation/PROTOCOL.md) as staged,
  resumable runs, and its per-run measures (initial gradients, edges, update sizes).
- `decision`: the study protocol's decision rule (one-sided and TOST paired t-tests, Holm),
  the verdict of each claim, and the power calculation.
- `stats`: t-intervals over seeds, paired differences, convergence and gradient-flow figures.
- `report`, `plots`: `results.csv`, `knockouts.csv`, `report.md` with verdicts, and figures.
"""

from resunet_jax.ablation import decision, grid, measures, plots, protocol, report, runner, stats
from resunet_jax.ablation.grid import RunSpec, ablate, run_specs, section, study
from resunet_jax.ablation.runner import Result, residual_masks, run, skip_masks, sweep

__all__ = [
  'Result',
  'RunSpec',
  'ablate',
  'decision',
  'grid',
  'measures',
  'plots',
  'protocol',
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
