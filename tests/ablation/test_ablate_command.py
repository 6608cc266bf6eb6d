"""experiments/ablate.py end to end on the quick grid: its files, a finished sweep runs nothing, and
its runs trained one by one, killed in the middle and resumed, give the populations' numbers.

The tests share one sweep (built once per session) and the session's compilation cache.
"""

import csv
import os
import pathlib
import signal
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICK = '--config=experiments/configs/ablate_quick.py'
COMPARED = ('run_id', 'dice', 'iou', 'accuracy', 'boundary_f1', 'hd95', 'steps_to_target', 'auc', 'grad_share')


def _command(workdir, *args):
  return [sys.executable, 'experiments/ablate.py', QUICK, f'--workdir={workdir}', *args]


@pytest.fixture(scope='module')
def env(tfds_dir):
  return {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}


@pytest.fixture(scope='module')
def sweep(shared, env, commands):
  """The quick sweep (built once per session) and what it printed: this worker's copy."""

  def build(workdir):
    result = commands.run(_command(workdir), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir / 'stdout.txt').write_text(result.stdout)

  workdir = shared.copy(shared.build('ablation_sweep', build))
  return workdir, (workdir / 'stdout.txt').read_text()


def _rows(workdir):
  with (workdir / 'results.csv').open() as f:
    return [{key: row[key] for key in ('arm', 'seed', *COMPARED)} for row in csv.DictReader(f)]


def test_quick_sweep_writes_every_file(sweep):
  workdir, stdout = sweep
  assert 'sweep of 8 runs in 3 populations' in stdout and '0 already done' in stdout
  rows = _rows(workdir)
  assert [(r['arm'], r['seed']) for r in rows] == [
    ('plain-all', '0'),
    ('plain-all', '1'),
    ('residual-all', '0'),
    ('residual-all', '1'),
    ('residual-all-attention-ds', '0'),
    ('residual-all-attention-ds', '1'),
    ('residual-all-nested-ds', '0'),
    ('residual-all-nested-ds', '1'),
  ]
  assert all(0 <= float(r['dice']) <= 1 for r in rows)
  with (workdir / 'knockouts.csv').open() as f:
    knockouts = list(csv.DictReader(f))
  assert len([k for k in knockouts if k['kind'] == 'skip']) == 8 * 4  # 2**depth masks per run
  # none, each block, all: 5 blocks of a concat or attention network, 6 of a depth-2 UNet++
  assert len([k for k in knockouts if k['kind'] == 'residual']) == 2 * 7 + 2 * 7 + 2 * 8
  assert len([k for k in knockouts if k['kind'] == 'gate']) == 2 * 4  # none, each of 2 gates, all
  assert len([k for k in knockouts if k['kind'] == 'prune']) == 2 * 2  # the heads of depths 1 and 2
  by_label = {(k['arm'], k['seed'], k['kind'], k['knockout']): float(k['dice']) for k in knockouts}
  for seed in ('0', '1'):  # the whole UNet++ is its deepest pruning level; no gate opened is the intact network
    assert (
      by_label['residual-all-nested-ds', seed, 'prune', 'depth 2']
      == by_label['residual-all-nested-ds', seed, 'skip', '11']
    )
    assert (
      by_label['residual-all-attention-ds', seed, 'gate', 'none']
      == by_label['residual-all-attention-ds', seed, 'skip', '11']
    )
  report = (workdir / 'report.md').read_text()
  for claim in ('speed up convergence', 'ease vanishing gradients', 'sharpen edges', 'allow deeper networks'):
    assert claim in report and claim in stdout
  assert '| `residual-all` | 11 | 2 |' in report and 'Residual knock-outs' in report
  assert 'Attention-gate knock-outs' in report and 'Pruned UNet++' in report
  for name in ('learning_curves', 'metrics_ci', 'gradient_norms', 'gradient_profile', 'knockout_heatmap'):
    assert (workdir / f'{name}.png').stat().st_size > 1000
  assert len(list((workdir / 'runs').glob('*/result.json'))) == 8


def test_a_finished_sweep_runs_nothing(sweep, env, commands):
  workdir, _ = sweep

  def files():
    return {p: p.stat().st_mtime_ns for folder in ('runs', 'populations') for p in (workdir / folder).rglob('*')}

  before = files()
  result = commands.run(_command(workdir), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '8 already done, 0 to run' in result.stdout
  assert files() == before  # no run or population folder was touched


def test_an_interrupted_sweep_of_separate_runs_resumes_to_the_numbers_of_the_populations(
  sweep, env, tmp_path, commands
):
  """Seed 0 with every run alone (`populations=False`: 2 runs), stopped by SIGTERM between
  checkpoints (the sweep stops, exit 0, and measures nothing of the cut-short run) and resumed:
  its rows and knock-outs are, bit for bit, the seed-0 rows of the sweep's population of 4
  (the plain run too, there a residual member scaled by 0). A population killed and resumed:
  tests/training/test_population.py."""
  workdir = tmp_path / 'interrupted'
  # The roads study alone (the skip-path study's arms have no plain twin to stand in for).
  args = (
    '--config.ablation.seeds=1',
    '--config.ablation.populations=False',
    '--config.ablation.studies.skip_paths.residual=()',
  )
  process = commands.start(_command(workdir, *args), env=env)
  deadline = time.monotonic() + 300
  try:
    while not list(workdir.glob('runs/*/checkpoints/3')):  # kill between checkpoints
      assert process.poll() is None, 'the sweep ended before it could be interrupted'
      assert time.monotonic() < deadline, 'the sweep did not get going'
      time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=300)
  finally:
    process.kill()
    process.wait()
  assert process.returncode == 0 and 'stopped by SIGTERM at step' in stdout, stdout[-2000:]
  assert not list(workdir.glob('runs/*/result.json'))  # a run cut short is never measured
  result = commands.run(_command(workdir, *args), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'sweep of 2 runs in 2 populations' in result.stdout and '0 already done, 2 to run' in result.stdout
  grouped = [row for row in _rows(sweep[0]) if row['seed'] == '0' and row['arm'] in ('plain-all', 'residual-all')]
  assert len(grouped) == 2 and _rows(workdir) == grouped
  with (workdir / 'knockouts.csv').open() as separate, (sweep[0] / 'knockouts.csv').open() as swept:
    assert list(csv.DictReader(separate)) == [
      row for row in csv.DictReader(swept) if row['seed'] == '0' and row['arm'] in ('plain-all', 'residual-all')
    ]
