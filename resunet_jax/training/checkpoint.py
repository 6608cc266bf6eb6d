"""Orbax checkpoints of (train state, Grain iterator positions, resolved config).

The state is a population's stacked state (`training.population`; leading axis = members),
and every iterator of the run is saved: `data_iter` and `data_iter_1`, `data_iter_2`, ... for a
population whose members have more than one seed. Saves are asynchronous. Retention keeps the
latest `keep` checkpoints and, for each ranking metric (one per member), the `keep_best` best,
and never deletes the latest (Orbax's `max_to_keep` with `best_fn`
would: see the preservation policy below). A checkpoint that fails to restore is skipped with
a warning naming it, and the previous one is used.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from resunet_jax.errors import UserError


class CheckpointWriteError(UserError):
  """A checkpoint or another workdir file could not be written (full disk, read-only workdir)."""


def _reason(error: BaseException) -> str:
  """The OS's words for a failed write (e.g. 'No space left on device'), else the message."""
  while error is not None:
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    error = error.__cause__ or error.__context__
  return ''


class Checkpoints:
  """The checkpoints of one workdir.

  Args:
    directory: where the numbered checkpoint folders live.
    keep: latest checkpoints kept.
    keep_best: best checkpoints kept besides, for each of `best_metrics`.
    best_metrics: keys of the metrics passed to `save` that rank checkpoints (a population's
      `Member.best_metric` of each member: each keeps its own best).
  """

  def __init__(
    self, directory: pathlib.Path, *, keep: int = 3, keep_best: int = 1, best_metrics: Sequence[str] = ('dice_0',)
  ):
    policies = ocp.checkpoint_managers

    def ranking(name):
      def score(metrics):  # Saves between evaluations carry {} and rank last.
        return metrics.get(name, float('-inf'))

      return score

    best = [
      policies.BestN(get_metric_fn=ranking(name), reverse=False, n=keep_best, keep_checkpoints_without_metrics=False)
      for name in best_metrics
    ]
    policy = policies.AnyPreservationPolicy([policies.LatestN(n=keep), *best])
    score = ranking(best_metrics[0])
    # best_fn also makes Orbax write the metrics to disk, so "best" survives a restart.
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=score, best_mode='max', enable_async_checkpointing=True, create=True
    )
    self.directory = pathlib.Path(directory)
    try:
      self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options)
    except OSError as e:
      raise CheckpointWriteError(
        f'cannot create {self.directory} ({e.strerror or e}); choose a --workdir that is writable'
      ) from e
    self._pending: int | None = None  # the step of the asynchronous save in flight

  def save(self, step: int, state, data_iterators: Sequence, config: dict, metrics: dict | None = None) -> None:
    """Starts an asynchronous save of `state`, the iterators' positions and `config` at `step`.

    Raises:
      CheckpointWriteError: this save, or the previous one still in flight, failed to write.
    """
    self.wait()  # One save at a time; a failure of the previous one is reported with its step.
    iterators = {_iterator_name(i): grain.checkpoint.CheckpointSave(it) for i, it in enumerate(data_iterators)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config), **iterators)
    try:
      self._check_writable()
      self.manager.save(step, args=args, metrics=metrics or {}, force=True)
    except Exception as e:  # noqa: BLE001 (whatever failed, the checkpoint was not written)
      raise self.write_error(f'checkpoint step {step}', e) from e
    self._pending = step

  def _check_writable(self) -> None:
    # Orbax creates a checkpoint's folders in a background thread, and a failure there shows
    # only as a timeout minutes later: a one-byte write here fails at once, with the OS's words.
    descriptor, name = tempfile.mkstemp(dir=self.directory, prefix='.write-test-')
    try:
      os.write(descriptor, b'0')
    finally:
      os.close(descriptor)
      os.unlink(name)

  def complete_steps(self) -> list[int]:
    """The steps whose checkpoints are complete on disk (not those still being written)."""
    self.manager.reload()
    return self.steps()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def read_config(self, step: int | None = None) -> dict | None:
    """The config saved with `step` (default latest), or None without checkpoints."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored.config

  def _saved_processes(self, step: int) -> int | None:
    """How many processes wrote the data-iterator state of `step` (None if it has none)."""
    names = [p.name for p in (self.directory / str(step) / 'data_iter').glob('process_*-of-*.json')]
    return int(names[0].rsplit('-of-', 1)[1].split('.')[0]) if names else None

  def restore(self, abstract_state, data_iterators: Sequence = (), step: int | None = None):
    """Restores the newest restorable checkpoint (or `step`) into `abstract_state`'s shardings.

    The data iterators' positions are restored too, unless the checkpoint was written by a
    different number of processes: the shards differ then, so the input order restarts (a
    warning says so) while the state resumes.

    Args:
      abstract_state: the state's structure as `jax.ShapeDtypeStruct`s with shardings.
      data_iterators: Grain iterators to move to the saved positions (restored in place).
      step: a specific step; default the latest that restores.

    Returns:
      `(state, step)`, or `(None, None)` when there is no checkpoint.

    Raises:
      UserError: checkpoints exist but none can be restored (never a silent fresh start).
    """
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    failures = []
    for candidate in candidates:
      args = {'state': ocp.args.StandardRestore(abstract_state)}
      if data_iterators:
        saved = self._saved_processes(candidate)
        if saved == jax.process_count():
          for index, iterator in enumerate(data_iterators):
            args[_iterator_name(index)] = grain.checkpoint.CheckpointRestore(iterator)
        else:
          logging.warning(
            'checkpoint %s holds the data position of %s processes, this run has %d: the state resumes, '
            'the input order restarts',
            self.directory / str(candidate),
            saved,
            jax.process_count(),
          )
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(**args))
      except Exception as e:  # noqa: BLE001 (any failure to read a checkpoint means: try the previous one)
        reason = ' '.join(str(e).split())[:300]
        failures.append(f'step {candidate}: {reason}')
        logging.warning(
          'checkpoint %s is unreadable (%s); trying the previous one', self.directory / str(candidate), reason
        )
        continue
      return restored.state, candidate
    if failures:
      raise UserError(
        f'no checkpoint in {self.directory} can be restored ({"; ".join(failures)}); '
        'repair them or move the folder away to start afresh'
      )
    return None, None

  def best_step(self, metric: str = 'dice_0') -> int | None:
    """The kept step with the highest `metric` among those saved with metrics, or None."""
    scored = [(self.manager.metrics(step) or {}).get(metric) for step in self.steps()]  # read from disk
    candidates = [(value, step) for value, step in zip(scored, self.steps(), strict=True) if value is not None]
    return max(candidates)[1] if candidates else None

  def wait(self) -> None:
    """Blocks until pending saves are on disk.

    Raises:
      CheckpointWriteError: the save in flight failed.
    """
    pending, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (an asynchronous save failed: say which and why)
      raise self.write_error(f'checkpoint step {pending}', e) from e

  def write_error(self, what: str, error: BaseException) -> CheckpointWriteError:
    """A one-line error for a failed write of `what`, naming the last complete checkpoint."""
    with contextlib.suppress(Exception):  # already failing: only the complete checkpoints matter now
      self.manager.wait_until_finished()
    complete = self.complete_steps()
    last = f'step {complete[-1]}' if complete else 'none'
    reason = _reason(error) or ' '.join(str(error).split())[:200]
    return CheckpointWriteError(
      f'cannot write {what} in {self.directory.parent} ({reason}); the last complete checkpoint is {last}: '
      'free disk space or make the workdir writable, then rerun the same command to resume from it'
    )

  def close(self) -> None:
    self.manager.close()


def _iterator_name(index: int) -> str:
  return 'data_iter' if index == 0 else f'data_iter_{index}'


def abstract_like(state, sharding) -> Any:
  """`state` as `ShapeDtypeStruct`s placed with `sharding` (the restore target)."""
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), state)
