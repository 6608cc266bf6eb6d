"""Injected faults: kills at 6 points of a run, SIGTERM, a full or read-only disk at checkpoint time, a dead peer.

Every interrupted run is restarted with the same command and must end bit-identical to the
uninterrupted one; no fault may leave a workdir that cannot be resumed.
"""

import os
import pathlib
import signal
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

WORKER = pathlib.Path(__file__).with_name('fault_worker.py')
# 12 steps, a checkpoint and a validation every 4: kill points before, during and after each.
ARGS = [
  '--model=resunet',
  '--config=experiments/configs/quick.py',
  '--config.train.num_steps=12',
  '--config.train.checkpoint_every=4',
  '--config.train.eval_every=4',
]
# Six kill points, each a different state to resume from: in a step before any checkpoint (2) and
# just after the first checkpoint's write started (5); during the first checkpoint's write (4: none
# complete) and the last's (12: step 8's is); in a validation pass between checkpoints (8) and in
# the final one (12: the training is complete).
KILLS = ['step:2', 'step:5', 'save:4', 'save:12', 'eval:8', 'eval:12']


@pytest.fixture(scope='module')
def env(tfds_dir):
  # Every process compiles the same programs: they share them through the session's JAX cache (conftest).
  return {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}


@pytest.fixture(scope='module')
def run(commands):
  def run(workdir, env, fault=None):
    command = [sys.executable, 'experiments/train.py'] if fault is None else [sys.executable, str(WORKER)]
    run_env = env if fault is None else {**env, 'FAULT': fault}
    return commands.run([*command, *ARGS, f'--workdir={workdir}'], env=run_env)

  return run


def _final_state(workdir):
  checkpoints = pathlib.Path(workdir) / 'checkpoints'
  step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  return step, ocp.StandardCheckpointer().restore((checkpoints / str(step) / 'state').absolute())


def _leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_run(workdir, reference):
  step, state = _final_state(workdir)
  assert step == reference[0] == 12
  expected, actual = _leaves(reference[1]), _leaves(state)
  assert expected.keys() == actual.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


@pytest.fixture(scope='module')
def reference(shared, env, run):
  def build(workdir):
    result = run(workdir, env)
    assert result.returncode == 0, result.stderr[-3000:]

  return _final_state(shared.build('uninterrupted_run', build))


@pytest.mark.parametrize('fault', KILLS)
def test_a_run_killed_anywhere_resumes_bit_identical(fault, tmp_path, env, reference, run):
  killed = run(tmp_path, env, fault)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = run(tmp_path, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'finished at step 12' in resumed.stdout
  _assert_same_run(tmp_path, reference)


def test_sigterm_checkpoints_the_current_step_exits_0_and_the_run_resumes_bit_identical(tmp_path, env, reference, run):
  stopped = run(tmp_path, env, 'term:6')  # between the checkpoints of steps 4 and 8
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert 'stopped by SIGTERM at step 6' in stopped.stdout
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())[-1] == 6
  resumed = run(tmp_path, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'finished at step 12' in resumed.stdout
  _assert_same_run(tmp_path, reference)


@pytest.mark.parametrize(
  ('fault', 'reason'), [('disk_full:8', 'File too large'), ('read_only:8', 'Read-only file system')]
)
def test_an_unwritable_disk_is_a_clear_error_and_the_previous_checkpoint_survives(
  fault, reason, tmp_path, env, reference, run
):
  failed = run(tmp_path, env, fault)
  assert failed.returncode == 2, failed.stderr[-3000:]
  message = failed.stderr.strip().splitlines()[-1]
  assert message.startswith('error: cannot write ') and reason in message, message
  assert 'the last complete checkpoint is step 4' in message
  resumed = run(tmp_path, env)  # space freed: the same command resumes from step 4
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _assert_same_run(tmp_path, reference)


@pytest.mark.parametrize('victim', [1, 0], ids=['peer dies', 'coordinator dies'])
def test_the_survivor_of_a_dead_peer_exits_with_a_clear_error_in_bounded_time(victim, tmp_path, env, commands):
  """Bound: the next collective (our one-line error) or JAX's heartbeat timeout, set to 10 s here
  (`parallel.heartbeat_timeout_s`, default 100 s); when the coordinator dies JAX stops at once."""
  import portpicker

  port = portpicker.pick_unused_port()
  two = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  args = [
    '--model=resunet',
    '--config=experiments/configs/quick.py',
    '--config.train.num_steps=100000',
    f'--config.parallel.coordinator_address=127.0.0.1:{port}',
    '--config.parallel.num_processes=2',
    '--config.parallel.heartbeat_timeout_s=10',
    f'--workdir={tmp_path}',
  ]
  processes = [
    commands.start([sys.executable, 'experiments/train.py', *args, f'--config.parallel.process_id={i}'], env=two)
    for i in range(2)
  ]
  try:
    deadline = time.monotonic() + 600  # two processes compiling on a 2-core machine under a loaded suite
    while not (tmp_path / 'checkpoints' / '3').is_dir():  # both are training
      assert all(p.poll() is None for p in processes), processes[0].output()[1][-3000:]
      assert time.monotonic() < deadline, 'the run did not get going'
      time.sleep(0.05)
    processes[victim].kill()
    killed = time.monotonic()
    processes[1 - victim].wait(timeout=120)  # never hangs: would raise TimeoutExpired
    took = time.monotonic() - killed
  finally:
    for process in processes:
      process.kill()
      process.wait()
  err = processes[1 - victim].output()[1]
  assert processes[1 - victim].returncode != 0
  assert took < 10 + 30, took  # the heartbeat timeout plus the time to notice and exit
  ours = 'error: a collective of the 2-process run failed after step '
  jax_message = 'This most likely indicates that another task died'
  # The peer killed in the middle of sending a message: the survivor's gloo transport reads part
  # of it as the next message's header and throws gloo::EnforceNotMet, which XLA's CPU collectives
  # do not catch, so the process aborts with gloo's line. Seen in about 1 run in 7, at e44c70f as
  # now (2026-11-26); the process still exits, in bounded time.
  gloo_message = "Received data size doesn't match expected size"
  # On failure, the lines that say what happened (a fatal signal prints a long thread dump after them).
  said = [line for line in err.splitlines() if any(word in line for word in ('rror', 'Fatal', 'bort'))]
  assert ours in err or jax_message in err or gloo_message in err, '\n'.join(said)[-3000:]
  if ours in err:
    assert err.strip().splitlines()[-1].startswith(ours) and 'restart every process with the same command' in err
