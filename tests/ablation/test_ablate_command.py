"""experiments/ablate.py end to end on the quick grid: its files, a finished sweep runs nothing,
and a sweep killed in the middle of a run resumes to the same numbers.

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
  assert 'sweep of 4 runs' in stdout and '0 already done' in stdout
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
  before = {p: p.stat().st_mtime_ns for p in (workdir / 'runs').glob('*/**/*') if p.is_file()}
  result = commands.run(_command(workdir), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '4 already done, 0 to run' in result.stdout
  after = {p: p.stat().st_mtime_ns for p in (workdir / 'runs').glob('*/**/*') if p.is_file()}
  assert after == before  # no run folder was touched


def test_an_interrupted_sweep_resumes_to_the_same_numbers(sweep, env, tmp_path, commands):
  """One seed (2 runs): killed in the second run, resumed; its rows are the 2-seed sweep's seed-0 rows."""
  workdir = tmp_path / 'interrupted'
  one_seed = '--config.ablation.seeds=1'
  process = commands.start(_command(workdir, one_seed), env=env)
  deadline = time.monotonic() + 300
  try:
    while True:  # Kill once a run is done and the next one is between checkpoints.
      finished = list(workdir.glob('runs/*/result.json'))
      midway = [p for p in workdir.glob('runs/*/checkpoints/3') if not (p.parents[1] / 'result.json').exists()]
      if finished and midway:
        break
      assert process.poll() is None, 'the sweep ended before it could be interrupted'
      assert time.monotonic() < deadline, 'the sweep did not get going'
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
  finally:
    process.wait()
  first = {p: p.stat().st_mtime_ns for p in finished}
  result = commands.run(_command(workdir, one_seed), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'{len(finished)} already done, 1 to run' in result.stdout
  assert {p: p.stat().st_mtime_ns for p in finished} == first  # finished runs were read back
  uninterrupted = [row for row in _rows(sweep[0]) if row['seed'] == '0']
  assert len(uninterrupted) == 2 and _rows(workdir) == uninterrupted  # bit-identical to the uninterrupted sweep
