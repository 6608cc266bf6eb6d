"""experiments/ablate.py end to end on the quick grid: its files, a finished sweep runs nothing,
a sweep killed in the middle of a population resumes to the same numbers, and its populations
give the numbers of the runs trained one by one.

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
  assert 'sweep of 4 runs in 1 populations' in stdout and '0 already done' in stdout
  rows = _rows(workdir)
  assert [(r['arm'], r['seed']) for r in rows] == [
    ('plain-all', '0'),
    ('plain-all', '1'),
    ('residual-all', '0'),
    ('residual-all', '1'),
  ]
  assert all(0 <= float(r['dice']) <= 1 for r in rows)
  with (workdir / 'knockouts.csv').open() as f:
    knockouts = list(csv.DictReader(f))
  assert len([k for k in knockouts if k['kind'] == 'skip']) == 4 * 4  # 2**depth masks per run
  assert len([k for k in knockouts if k['kind'] == 'residual']) == 2 * 7  # none, 5 blocks, all
  report = (workdir / 'report.md').read_text()
  for claim in ('speed up convergence', 'ease vanishing gradients', 'sharpen edges', 'allow deeper networks'):
    assert claim in report and claim in stdout
  assert '| `residual-all` | 11 | 2 |' in report and 'Residual knock-outs' in report
  for name in ('learning_curves', 'metrics_ci', 'gradient_norms', 'gradient_profile', 'knockout_heatmap'):
    assert (workdir / f'{name}.png').stat().st_size > 1000
  assert len(list((workdir / 'runs').glob('*/result.json'))) == 4


def test_a_finished_sweep_runs_nothing(sweep, env, commands):
  workdir, _ = sweep

  def files():
    return {p: p.stat().st_mtime_ns for folder in ('runs', 'populations') for p in (workdir / folder).rglob('*')}

  before = files()
  result = commands.run(_command(workdir), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '4 already done, 0 to run' in result.stdout
  assert files() == before  # no run or population folder was touched


def test_an_interrupted_sweep_resumes_to_the_same_numbers(sweep, env, tmp_path, commands):
  """One seed (a population of a plain and a residual member) killed between checkpoints and resumed;
  its rows are the seed-0 rows of the 2-seed sweep (a population of 4)."""
  workdir = tmp_path / 'interrupted'
  one_seed = '--config.ablation.seeds=1'
  process = commands.start(_command(workdir, one_seed), env=env)
  deadline = time.monotonic() + 300
  try:
    while not list(workdir.glob('populations/*/checkpoints/3')):  # kill between checkpoints
      assert process.poll() is None, 'the sweep ended before it could be interrupted'
      assert time.monotonic() < deadline, 'the sweep did not get going'
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
  finally:
    process.wait()
  assert not list(workdir.glob('runs/*/result.json'))
  result = commands.run(_command(workdir, one_seed), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '0 already done, 2 to run' in result.stdout
  uninterrupted = [row for row in _rows(sweep[0]) if row['seed'] == '0']
  assert len(uninterrupted) == 2 and _rows(workdir) == uninterrupted  # bit-identical to the uninterrupted sweep


def test_populations_give_the_numbers_of_the_runs_trained_one_by_one(sweep, env, tmp_path, commands):
  workdir = tmp_path / 'separate'
  """Seed 0 alone (2 runs); its rows are the seed-0 rows of the sweep's population of 4."""
  result = commands.run(_command(workdir, '--config.ablation.populations=False', '--config.ablation.seeds=1'), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'sweep of 2 runs in 2 populations' in result.stdout
  grouped = [row for row in _rows(sweep[0]) if row['seed'] == '0']
  assert len(grouped) == 2 and _rows(workdir) == grouped  # bit-identical, the plain run too (a member scaled by 0)
  with (workdir / 'knockouts.csv').open() as separate, (sweep[0] / 'knockouts.csv').open() as swept:
    assert list(csv.DictReader(separate)) == [row for row in csv.DictReader(swept) if row['seed'] == '0']
