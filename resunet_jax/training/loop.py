"""`train_and_evaluate(config, workdir)`: the training loop around the pure steps.

Restarting with the same workdir resumes from the newest checkpoint: step, optimizer state
(and with it the learning-rate schedule), BatchNorm statistics, EMA and the data iterator's
position all continue, so an interrupted run ends bit-identical to an uninterrupted one on CPU.
SIGTERM saves a checkpoint after the current step and returns normally. A non-finite loss
stops the run with the step number; the last good checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from resunet_jax import configs, data, evaluation, losses, models, runtime
from resunet_jax.cpu import hostmem
from resunet_jax.errors import PeerLostError, UserError
from resunet_jax.training import checkpoint, parallel, reporting
from resunet_jax.training import state as state_lib


class NonFiniteLossError(UserError):
  """The loss or gradient became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
  """What a run produced.

  Attributes:
    step: the last step trained.
    validation: the final validation metrics (empty if none were computed).
    files: artefact name -> path.
    stopped: True when SIGTERM ended the run early.
  """

  step: int
  validation: dict
  files: dict
  stopped: bool = False


def resolve(config) -> tuple[models.ModelConfig, data.DatasetInfo, dict]:
  """The model config, dataset info and the resolved config dict (what config.json holds)."""
  configs.resolve_model(config.preset, config.model)  # Config mistakes fail before data work.
  info = data.dataset_info(config.data)
  model_config = configs.resolve_model(config.preset, config.model, num_classes=info.model_outputs)
  resolved = config.to_dict()
  resolved['model'] = model_config.to_dict()
  return model_config, info, resolved


def summary(config) -> str:
  """The dataset and model summaries of `config` (no training, no allocation)."""
  model_config, info, _ = resolve(config)
  return '\n'.join(
    [
      f'data: {info.name}, {info.num_classes} classes, images {info.image_shape}, splits {dict(info.split_sizes)}',
      f'model: {config.preset} {model_config}',
      models.summary.summarize(model_config, (1, *info.image_shape)),
    ]
  )


def default_workdir(resolved: dict) -> pathlib.Path:
  """runs/<preset>-<dataset>-<hash of the resolved config>: same config, same run (resumes).

  Training there also points runs/latest at it.
  """
  name = resolved['data']['name'].replace('/', '_')
  return pathlib.Path('runs') / f'{resolved["preset"]}-{name}-{configs.config_hash(resolved)}'


def _link_latest(workdir: pathlib.Path) -> None:
  """Points runs/latest at `workdir`, so the next command can say --workdir=runs/latest."""
  workdir.mkdir(parents=True, exist_ok=True)
  link = workdir.parent / 'latest'
  if link.exists() and not link.is_symlink():
    return  # Someone's own folder named latest: leave it alone.
  temporary = workdir.parent / f'.latest-{os.getpid()}'
  temporary.unlink(missing_ok=True)
  temporary.symlink_to(workdir.name)
  os.replace(temporary, link)


def _check_same_model(saved: dict | None, resolved: dict, workdir: pathlib.Path) -> None:
  if saved is None:
    return
  differing = sorted(k for k in resolved['model'] if saved.get('model', {}).get(k) != resolved['model'][k])
  if differing:
    what = ', '.join(f'{k} {saved["model"].get(k)!r} -> {resolved["model"][k]!r}' for k in differing[:4])
    raise UserError(
      f'workdir {workdir} holds checkpoints of a different model ({what}); use another --workdir or delete it'
    )


def initial_state_and_steps(config, model_config: models.ModelConfig, info: data.DatasetInfo, mesh):
  """A freshly initialised train state, replicated on `mesh`, and the jitted `(train_step, eval_step)`.

  What `train_and_evaluate` trains with (before resuming); `benchmarks/train_loop.py` times the
  same step bare.
  """
  layers = runtime.layers(config.runtime.backend)
  model = models.UNet(model_config, axis_name=parallel.model_axis_name(config.parallel.strategy), layers=layers)
  optimizer = state_lib.make_optimizer(config.train)
  input_shape = (1, *info.image_shape)

  def init():
    return state_lib.create_train_state(
      model, optimizer, input_shape, seed=config.seed, ema_decay=config.train.ema_decay
    )

  train_state = parallel.create_sharded(init, mesh)
  jax.clear_caches()  # the initialiser's executable (50 MB at base 64) is never run again
  weights = losses.LossWeights(config.train.cross_entropy_weight, config.train.dice_weight)
  return train_state, *parallel.compile_steps(config.parallel.strategy, mesh, weights)


class _Preemption:
  """Turns SIGTERM into a flag checked between steps (agreed on by all processes)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int, every: int) -> bool:
    """Whether to checkpoint and stop after `step`; across processes only every `every` steps
    (agreeing takes a collective), so SIGTERM is honoured within `every` steps there."""
    if jax.process_count() > 1:
      if step % every:
        return False
      return bool(multihost_utils.process_allgather(np.int32(self.requested)).max()) or bool(
        multihost_utils.reached_preemption_sync_point(step)
      )
    return self.requested

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str | pathlib.Path | None = None, *, verbose: bool = True) -> RunResult:
  """Trains, evaluates and checkpoints `config` in `workdir` (resuming what is there).

  To keep peak host memory down it empties JAX's compilation caches once, after initialising
  (`jax.clear_caches()`; the initialiser's executable is 50 MB at base 64): functions the
  calling process compiled before are compiled again on their next call, with the same results.

  Args:
    config: the experiment config (see `resunet_jax.configs.base_config`).
    workdir: output folder; default `default_workdir` of the resolved config.
    verbose: print each validation and keep the progress bar when done; False inside a
      sweep, whose own display says where it is.

  Returns:
    The `RunResult`.
  """
  parallel.initialize_distributed(config.parallel)
  model_config, info, resolved = resolve(config)
  lead = jax.process_index() == 0
  if workdir:
    workdir = pathlib.Path(workdir)
  else:
    workdir = default_workdir(resolved)
    if lead:
      _link_latest(workdir)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)
  if config.train.num_steps < 1:
    raise UserError(f'train.num_steps={config.train.num_steps} must be at least 1')

  ckpt = checkpoint.Checkpoints(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
  _check_same_model(ckpt.read_config(), resolved, workdir)
  files = {'config': workdir / 'config.json', 'checkpoints': workdir / 'checkpoints'}
  if lead:
    try:
      files['config'].write_text(json.dumps(resolved, indent=2, sort_keys=True))
    except OSError as e:
      raise ckpt.write_error(files['config'].name, e) from e

  train_state, train_fn, eval_fn = initial_state_and_steps(config, model_config, info, mesh)
  schedule = state_lib.make_schedule(config.train)
  per_process = config.train.batch_size // jax.process_count()
  pipeline = data.make_pipeline(config.data, 'train', batch_size=per_process, seed=config.seed, train=True)
  train_iter = iter(pipeline)
  restored, restored_step = ckpt.restore(checkpoint.abstract_like(train_state, parallel.replicated(mesh)), train_iter)
  if restored is not None:
    train_state = restored
    logging.info('resumed from step %d in %s', restored_step, workdir)

  writer = reporting.MetricWriter(workdir, enabled=lead)

  def log(step: int, split: str, values: dict) -> None:
    try:
      writer.write(step, split, values)
    except OSError as e:
      raise ckpt.write_error(writer.jsonl.name, e) from e

  files.update(metrics=writer.jsonl, tensorboard=writer.tensorboard_dir)
  preemption = _Preemption()
  sharding = parallel.batch_sharding(mesh)
  step = start_step = int(train_state.step)
  validation: dict = {}
  samples = None
  keep = config.train.num_sample_images
  last_time, last_step = time.perf_counter(), step
  lost_peer = False
  try:
    bar, live = reporting.progress_bar(
      show=lead, total=config.train.num_steps, initial=step, leave=verbose, unit='step', dynamic_ncols=True
    )
    with bar:
      while step < config.train.num_steps:
        batch = data.to_global(next(train_iter), sharding)
        train_state, step_metrics = train_fn(train_state, batch)
        if step == start_step and jax.default_backend() == 'cpu':  # compiled: return what it freed
          hostmem.release_free_memory()
        step += 1
        bar.update(1)
        final = step == config.train.num_steps
        stop = preemption.should_stop(step, config.train.log_every)
        save = final or stop or step % config.train.checkpoint_every == 0
        if save or step % config.train.log_every == 0:
          values = jax.device_get(step_metrics)
          if not (np.isfinite(values['loss']) and np.isfinite(values['grad_norm'])):
            ckpt.wait()
            kept = ckpt.steps()
            raise NonFiniteLossError(
              f'loss became {values["loss"]} at step {step}; the last good checkpoint is step '
              f'{kept[-1] if kept else "none"} in {ckpt.directory}; lower train.learning_rate or check the data'
            )
          now = time.perf_counter()
          values['learning_rate'] = schedule(step - 1)  # the rate this step's update used
          values['images_per_sec'] = (step - last_step) * config.train.batch_size / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          log(step, 'train', values)
          postfix = {'loss': f'{values["loss"]:.4f}', 'dice': f'{values["dice"]:.3f}'}
          postfix['img_s'] = f'{values["images_per_sec"]:.1f}'
          bar.set_postfix(postfix)
          if lead and verbose and not live:
            shown = ', '.join(f'{k} {v}' for k, v in postfix.items())
            reporting.progress_line(f'step {step}/{config.train.num_steps}: {shown}')
        evaluated = None
        if final or step % config.train.eval_every == 0:
          per_image, samples = evaluation.evaluate_split(eval_fn, train_state, config, mesh, keep=keep if final else 0)
          validation = evaluation.summarize(per_image)
          evaluated = validation
          log(step, 'validation', validation)
          if verbose:
            bar.write(f'step {step}: validation ' + ', '.join(f'{k} {v:.4f}' for k, v in validation.items()))
          last_time = time.perf_counter()  # Evaluation time is not training throughput.
        if save:
          ckpt.save(step, train_state, train_iter, resolved, metrics=evaluated)
        if stop and not final:
          ckpt.wait()
          return RunResult(step, validation, files, stopped=True)
    ckpt.wait()
    if samples is None:  # Resumed a finished run: evaluate it once more for the report.
      per_image, samples = evaluation.evaluate_split(eval_fn, train_state, config, mesh, keep=keep)
      validation = evaluation.summarize(per_image)
    if lead:
      files.update(_write_figures(samples, workdir, writer))
    return RunResult(step, validation, files)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    lost_peer = True  # a collective failed: most often another process died
    complete = ckpt.complete_steps()
    reason = ' '.join(str(e).split())[:200]
    raise PeerLostError(
      f'a collective of the {jax.process_count()}-process run failed after step {step} ({reason}); if a process '
      f'died, restart every process with the same command: the run resumes from the last complete checkpoint, '
      f'step {complete[-1] if complete else "none"}'
    ) from None
  finally:
    preemption.restore()
    writer.close()
    if not lost_peer:  # closing waits on the other processes
      ckpt.close()


def _write_figures(samples: dict, workdir: pathlib.Path, writer) -> dict:
  """Sample predictions and learning curves."""
  paths = {'predictions': workdir / 'predictions.png', 'learning_curves': workdir / 'learning_curves.png'}
  reporting.plot_predictions(samples['image'], samples['mask'], samples['prediction'], paths['predictions'])
  if writer.jsonl.exists():
    reporting.plot_learning_curves(writer.jsonl, paths['learning_curves'])
  return paths


def describe(result: RunResult) -> str:
  """The end-of-run summary: where each artefact went and the final validation metrics."""
  lines = [f'{"stopped by SIGTERM at" if result.stopped else "finished at"} step {result.step}']
  lines += [f'  {name:<16} {path}' for name, path in result.files.items()]
  if result.validation:
    lines.append('validation: ' + ', '.join(f'{k} {v:.4f}' for k, v in result.validation.items()))
  return '\n'.join(lines)
