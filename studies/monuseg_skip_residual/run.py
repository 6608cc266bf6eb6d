r"""Runs the MoNuSeg skip/residual study (PROTOCOL.md beside this file), stage after stage, resuming.

  export MONUSEG_DIR=/path/to/MoNuSeg     # experiments/configs/monuseg.py says where to get it
  python studies/monuseg_skip_residual/run.py                    # train what comes next, until done
  python studies/monuseg_skip_residual/run.py --max-runs=1       # one run, then stop
  python studies/monuseg_skip_residual/run.py --status           # what comes next, and the plan

Each finished run appends one line to results/runs.csv (`study.Row`); the rows decide what
comes next (`study.next_stage`), so a study stopped anywhere, on any machine, resumes from its
committed CSV. Training lives in --workdir (never committed; a run cut off mid-training resumes
from its checkpoint there). When the timing and pilot stages are done it writes results/plan.md
(the budget, the cuts and the projected hours) and stops until that file is committed; when every
stage is done it writes results/report.md (`analysis.py`). SIGTERM stops at once with the finished
rows kept.
"""

import csv
import json
import math
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `studies`, `experiments` and `benchmarks` from a clone

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks.monuseg import cpu_name  # noqa: E402
from resunet_jax import cli  # noqa: E402
from resunet_jax.ablation import runner, stats  # noqa: E402
from resunet_jax.data import sources  # noqa: E402
from studies.monuseg_skip_residual import analysis, study  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / 'results'
TEST_METRICS = ('dice', 'iou', 'boundary_f1', 'hd95')
FIELDS = (
  'stage',
  'arm',
  'depth',
  'rate',
  'steps',
  'seed',
  'val_dice',
  'window_auc',
  'grad_log_ratio',
  'params',
  'wall_s',
  *(f'test_{m}' for m in TEST_METRICS),
  'curve',
  'run_id',
  'cpu',
)

_WORKDIR = flags.DEFINE_string('workdir', 'runs/monuseg_skip_residual', 'Folder of the training runs.')
_RESULTS = flags.DEFINE_string('results', str(RESULTS), 'Folder of runs.csv, baseline.json and plan.md.')
_MAX_RUNS = flags.DEFINE_integer('max_runs', 0, 'Stop after this many runs (0: until the study is done).')
_STATUS = flags.DEFINE_bool('status', False, 'Print what comes next and the plan; train nothing.')


def read_rows(path: pathlib.Path) -> list[study.Row]:
  """The rows of a runs.csv (none if it does not exist)."""
  if not path.exists():
    return []
  rows = []
  with path.open(newline='') as f:
    for line in csv.DictReader(f):
      run = study.Run(
        line['stage'], line['arm'], float(line['rate']), int(line['steps']), int(line['seed']), int(line['depth'])
      )
      test = {m: float(line[f'test_{m}']) for m in TEST_METRICS if line[f'test_{m}']}
      numbers = {k: float(line[k]) for k in ('val_dice', 'window_auc', 'grad_log_ratio', 'wall_s')}
      rows.append(study.Row(run, params=int(line['params']), test=test, **numbers))
  return rows


def grad_log_ratio(result: runner.Result) -> float:
  """Mean over logged training steps of log10(per-parameter gradient RMS of enc_0 / of dec_0)."""
  ratios = [
    math.log10(
      stats.gradient_rms(r, 'enc_0', result.param_counts) / stats.gradient_rms(r, 'dec_0', result.param_counts)
    )
    for r in result.gradients
    if r['grad_norm/enc_0'] > 0 and r['grad_norm/dec_0'] > 0
  ]
  return float(np.mean(ratios)) if ratios else float('nan')


def measure(run: study.Run, workdir: pathlib.Path) -> dict:
  """Trains (or resumes) `run` and returns its runs.csv line."""
  config = run.config()
  spent = runner.run_dir(config, workdir) / 'spent_s'  # seconds of earlier attempts a SIGTERM cut short
  before = float(spent.read_text()) if spent.exists() else 0.0
  start = time.perf_counter()
  try:
    result = runner.run_population(config, [config], workdir, test_split=run.split, knockouts=False)[0]
  except runner.Stopped:
    spent.parent.mkdir(parents=True, exist_ok=True)
    spent.write_text(f'{before + time.perf_counter() - start:.1f}')
    raise
  final_step, final_dice = result.curve[-1]
  if final_step != run.steps:
    raise RuntimeError(f'{result.run_id}: the last validation is at step {final_step}, not {run.steps}')
  window = [(s, d) for s, d in result.curve if s <= study.WINDOW]
  line = {
    'stage': run.stage,
    'arm': run.arm,
    'depth': run.depth,
    'rate': f'{run.rate:g}',
    'steps': run.steps,
    'seed': run.seed,
    'val_dice': f'{final_dice:.6f}',
    'window_auc': f'{stats.area_under_curve(window, study.WINDOW):.6f}',
    'grad_log_ratio': f'{grad_log_ratio(result):.6f}',
    'params': sum(result.param_counts.values()),
    'wall_s': f'{before + result.wall_s:.1f}',
    'curve': ' '.join(f'{s}:{d:.4f}' for s, d in result.curve),
    'run_id': result.run_id,
    'cpu': cpu_name(),
  }
  for m in TEST_METRICS:
    line[f'test_{m}'] = f'{result.test[m]:.6f}' if run.split == 'test' else ''
  return line


def append(path: pathlib.Path, line: dict) -> None:
  new = not path.exists()
  with path.open('a', newline='') as f:
    writer = csv.DictWriter(f, FIELDS)
    if new:
      writer.writeheader()
    writer.writerow(line)


def baseline(results: pathlib.Path) -> float:
  """D0 from results/baseline.json, written from the validation masks on first use."""
  path = results / 'baseline.json'
  if not path.exists():
    source = sources.open_split(study.base_config().data, 'validation')
    fractions = {str(r['id']): float(np.mean(np.asarray(r['mask']) > 0)) for r in source}
    d0 = study.constant_dice(fractions.values())
    path.write_text(json.dumps({'d0': d0, 'nucleus_fraction': fractions}, indent=1) + '\n')
  return json.loads(path.read_text())['d0']


def committed(path: pathlib.Path) -> bool:
  """`path` is tracked by git and unchanged since the last commit."""
  tracked = subprocess.run(['git', 'ls-files', '--error-unmatch', path.name], cwd=path.parent, capture_output=True)
  changed = subprocess.run(['git', 'diff', '--quiet', 'HEAD', '--', path.name], cwd=path.parent, capture_output=True)
  return path.exists() and tracked.returncode == 0 and changed.returncode == 0


def plan_text(rows: list[study.Row]) -> str:
  steps, cuts, hours = study.plan(rows)
  pilot = {
    (arm, n): study.mean_dice(rows, arm, study.PILOT_RATE, n) for arm in study.PILOT_ARMS for n in study.PILOT_BUDGETS
  }
  lines = [
    '# The compute plan, projected from the timing and pilot rows (before any tuning run)',
    '',
    f'Budget B = {study.budget(rows)} steps by the pilot rule; confirmatory budget {steps} steps.',
    '',
    '| pilot arm (lr 1e-3, seeds 1000-1001) | ' + ' | '.join(f'{n} steps' for n in study.PILOT_BUDGETS) + ' |',
    '|---|' + '---|' * len(study.PILOT_BUDGETS),
    *(
      f'| {arm} | ' + ' | '.join(f'{pilot[arm, n]:.4f}' for n in study.PILOT_BUDGETS) + ' |' for arm in study.PILOT_ARMS
    ),
    '',
    '| stage | projected hours |',
    '|---|---|',
    *(f'| {stage} | {h:.2f} |' for stage, h in hours.items()),
    f'| total | {sum(hours.values()):.2f} (limit {study.HOURS:g}) |',
    '',
    "Cuts made, in the protocol's order: " + ('; '.join(study.CUTS[:cuts]) if cuts else 'none') + '.',
    *(
      [
        f'Over the limit after every cut by {sum(hours.values()) - study.HOURS:.2f} h: '
        'what is left runs anyway (amendment 1).'
      ]
      if sum(hours.values()) > study.HOURS
      else []
    ),
    '',
    '| arm | depth | projected seconds a run |',
    '|---|---|---|',
    *(f'| {arm} | 4 | {study.seconds(rows, arm, steps):.0f} |' for arm in study.ARMS),
    *(
      f'| {arm} | {depth} | {study.seconds(rows, arm, steps, depth):.0f} |'
      for depth in study.scope(cuts).depths
      for arm in study.DEPTH_ARMS
    ),
    '',
    f'Measured on {cpu_name()}.',
  ]
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --workdir=runs/monuseg_skip_residual')
  results, workdir = pathlib.Path(_RESULTS.value), pathlib.Path(_WORKDIR.value)
  results.mkdir(parents=True, exist_ok=True)
  csv_path = results / 'runs.csv'
  d0 = baseline(results)
  runner.use_compilation_cache(workdir / 'compilation_cache')
  done = 0
  with runner.sigterm_stops():
    while True:
      rows = read_rows(csv_path)
      stage = study.next_stage(rows, d0, committed(results / 'plan.md'))
      if stage.name == 'plan' and not (results / 'plan.md').exists():
        (results / 'plan.md').write_text(plan_text(rows))
      if stage.name == 'done':
        (results / 'report.md').write_text(analysis.render(analysis.analyse(rows, d0), rows))
      print(
        f'{len(rows)} runs done; next: {stage.name}, {len(stage.runs)} runs'
        + (f' ({stage.reason})' if stage.reason else '')
      )
      if _STATUS.value or not stage.runs or (_MAX_RUNS.value and done >= _MAX_RUNS.value):
        return
      run = stage.runs[0]
      print(f'  training {run}')
      try:
        append(csv_path, measure(run, workdir))
      except runner.Stopped as e:  # SIGTERM: exit 0 like train.py; rerunning resumes from the checkpoint
        print(e)
        return
      done += 1


if __name__ == '__main__':
  cli.run(main)
