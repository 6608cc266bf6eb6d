"""Runs experiments/train.py (same flags) with one fault injected, named by $FAULT = 'KIND:STEP'.

KIND:
  step       SIGKILL while the computation of step STEP is in flight (just dispatched)
  term       SIGTERM at the same point (a preemption notice: the run checkpoints STEP and exits 0)
  save       SIGKILL just after the checkpoint of STEP started its asynchronous write
  eval       SIGKILL halfway through the validation pass at STEP
  disk_full  from the checkpoint of STEP on, every file write of the process fails with EFBIG,
             as on a full disk (RLIMIT_FSIZE = 0 binds root too)
  read_only  from the checkpoint of STEP on, creating folders and opening files for writing in
             the workdir fail with EROFS, as on a disk remounted read-only

The faults are injected from outside the library, by wrapping its functions here.
"""

import errno
import os
import resource
import runpy
import signal
import sys

KIND, AT = os.environ['FAULT'].split(':')
AT = int(AT)

from resunet_jax.training import checkpoint, evaluation, parallel  # noqa: E402


def die(sig=signal.SIGKILL):
  sys.stdout.flush()
  os.kill(os.getpid(), sig)


def wrap_train_step(sig=signal.SIGKILL):
  compile_steps = parallel.compile_steps

  def compile_with_fault(*args, **kwargs):
    train, evaluate = compile_steps(*args, **kwargs)

    def train_with_fault(state, batch):
      step = int(state.step) + 1
      out = train(state, batch)  # dispatched asynchronously: the step is now running
      if step == AT:
        die(sig)
      return out

    return train_with_fault, evaluate

  parallel.compile_steps = compile_with_fault


def wrap_save(before=None, after=None):
  save = checkpoint.Checkpoints.save

  def save_with_fault(self, step, *args, **kwargs):
    if step == AT and before:
      self.wait()  # the fault strikes this save, not the previous one still in flight
      before()
    save(self, step, *args, **kwargs)
    if step == AT and after:
      after()

  checkpoint.Checkpoints.save = save_with_fault


def wrap_evaluation():
  map_split = evaluation.map_split

  def map_split_with_fault(fn, state, *args, **kwargs):
    at_step = int(state.step) == AT
    for index, item in enumerate(map_split(fn, state, *args, **kwargs)):
      if at_step and index == 2:
        die()
      yield item

  evaluation.map_split = map_split_with_fault


def fill_disk():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write then returns EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def make_workdir_read_only():
  workdir = os.path.abspath(next(a for a in sys.argv if a.startswith('--workdir=')).split('=', 1)[1])
  mkdir, open_ = os.mkdir, os.open

  def refuse(path):
    if os.path.abspath(os.fspath(path)).startswith(workdir):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

  def read_only_mkdir(path, *args, **kwargs):
    refuse(path)
    return mkdir(path, *args, **kwargs)

  def read_only_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      refuse(path)
    return open_(path, flags, *args, **kwargs)

  os.mkdir, os.open = read_only_mkdir, read_only_open


FAULTS = {
  'step': wrap_train_step,
  'term': lambda: wrap_train_step(signal.SIGTERM),
  'save': lambda: wrap_save(after=die),
  'eval': wrap_evaluation,
  'disk_full': lambda: wrap_save(before=fill_disk),
  'read_only': lambda: wrap_save(before=make_workdir_read_only),
}

if __name__ == '__main__':
  FAULTS[KIND]()
  sys.argv = ['experiments/train.py', *sys.argv[1:]]
  runpy.run_path('experiments/train.py', run_name='__main__')
