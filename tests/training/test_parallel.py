"""The strategies agree: jit on 1 and 4 devices, per-device (shard_map) on 4, and 2 processes.

Tolerance: SGD with momentum and BatchNorm, 3 steps; parameters agree to 1e-5 and BatchNorm
statistics to 1e-5 absolute. What differs is only float32 summation order when a reduction
(gradient all-reduce, batch statistics) is split over devices. SGD, not Adam: Adam divides by
the root of the squared gradient, which turns the ~1e-9 round-off on the conv biases in front
of BatchNorm (whose true gradient is exactly 0) into full-size steps of +-lr, so those biases
would differ by up to lr per step between device counts while everything else agrees.
"""

import pathlib
import sys

import numpy as np
import portpicker
import pytest

WORKER = pathlib.Path(__file__).with_name('step_worker.py')


def _run(commands, out, strategy, devices, port=None, process_id=None, processes=None):
  args = [sys.executable, str(WORKER), str(out), strategy, str(devices)]
  if port:
    args += [str(port), str(process_id), str(processes)]
  return commands.start(args)


def _finish(*workers):
  for worker in workers:
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]


@pytest.fixture(scope='module')
def reference(shared, commands):
  def build(folder):
    folder.mkdir()
    _finish(_run(commands, folder / 'jit1.npz', 'jit', 1))

  return dict(np.load(shared.build('one_device_steps', build) / 'jit1.npz'))


def _assert_close(result, reference):
  assert result.keys() == reference.keys()
  assert int(result['compilations']) == 1
  for key in reference:
    np.testing.assert_allclose(result[key], reference[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize('strategy', ['jit', 'pmap'])
def test_four_devices_match_one(tmp_path, reference, strategy, commands):
  out = tmp_path / f'{strategy}4.npz'
  _finish(_run(commands, out, strategy, 4))
  _assert_close(dict(np.load(out)), reference)


def test_two_processes_match_one(tmp_path, reference, commands):
  out = tmp_path / 'two_processes.npz'
  port = portpicker.pick_unused_port()
  _finish(*[_run(commands, out, 'jit', 2, port, i, 2) for i in range(2)])
  _assert_close(dict(np.load(out)), reference)
