"""`train_and_evaluate(config, workdir)`: the training loop around the pure steps.

Restarting with the same workdir resumes from the newest checkpoint: step, optimizer state
(and with it the learning-rate schedule), BatchNorm statistics, EMA and the data iterator's
position all continue, so an interrupted run ends bit-identical to an uninterrupted one on CPU.
SIGTERM saves a checkpoint after the current step and returns normally. A non-finite loss
stops its member (`steps.guarded_train_step`); with no member left the run stops with the
step number, and the last good checkpoint stays.
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

from resunet_jax import configs, data, losses, models, runtime
from resunet_jax.errors import PeerLostError, UserError
from resunet_jax.training import checkpoint, evaluation, parallel, population, reporting
from resunet_jax.training import state as state_lib


class NonFiniteLossError(UserError):
  """The loss or gradient became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
  """What a run produced.

  Attributes:
    step: the last step trained.
    validation: each member's final validation metrics (empty if none were computed).
    files: artefact name -> path.
    members: the population's members (one for an ordinary run).
    stopped: True when SIGTERM ended the run early.
  """

  step: int
  validation: list[dict]
  files: dict
  members: list[population.Member]
  stopped: bool = False


def resolve(config) -> tuple[models.ModelConfig, data.DatasetInfo, dict]:
  """The model config, dataset info and the resolved config dict (what config.json holds).

  A volume dataset gets a 3-D network (`model.spatial_dims` None becomes 3) whose pooling follows
  the training split's median voxel spacing (`model.pool_strides` None becomes
  `models.pool_strides_for_spacing`); a model whose dimensions differ from the data's is an error.
  """
  early = configs.resolve_model(config.preset, config.model)  # Config mistakes fail before data work.
  info = data.dataset_info(config.data)
  dims = config.model.get('spatial_dims')
  if dims is not None and dims != info.spatial_dims:
    what = {2: '2-D images', 3: 'volumes'}
    raise UserError(
      f'model.spatial_dims={dims} but {info.name} holds {what[info.spatial_dims]}; '
      f'set --config.model.spatial_dims={info.spatial_dims} (or leave it unset: the data decides)'
    )
  extra = {}
  if info.spatial_dims == 3:
    extra['spatial_dims'] = 3
    if config.model.get('pool_strides') is None:
      extra['pool_strides'] = models.pool_strides_for_spacing(info.spacing, early.depth)
  section = {**dict(config.model), **extra}
  model_config = configs.resolve_model(config.preset, section, num_classes=info.model_outputs)
  resolved = config.to_dict()
  resolved['model'] = model_config.to_dict()
  stats = info.normalization.stats() if info.normalization.kind != 'fixed' else None
  resolved['data'].update(channels=info.image_shape[-1], stats=stats or None)
  return model_config, info, resolved


def with_resolved_data(config, resolved: dict):
  """`config` with the data section's channels and statistics as resolved (what config.json says),
  so that the run's pipelines use the recorded numbers."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.channels = resolved['data']['channels']
    config.data.stats = resolved['data']['stats']
  return config


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
  # A field added since the run started has, in that run, the value every earlier run had.
  model = {**configs.ADDED_KEYS['model'], **saved.get('model', {})}
  differing = sorted(k for k, v in resolved['model'].items() if json.dumps(model.get(k)) != json.dumps(v))  # () is []
  if differing:
    what = ', '.join(f'{k} {model.get(k)!r} -> {resolved["model"][k]!r}' for k in differing[:4])
    raise UserError(
      f'workdir {workdir} holds checkpoints of a different model ({what}); use another --workdir or delete it'
    )


def build_population(config, model_config: models.ModelConfig, info: data.DatasetInfo, mesh) -> population.Population:
  """The run's freshly initialised `Population` on `mesh`, with its compiled steps.

  What `train_and_evaluate` trains (before resuming); `benchmarks/train_loop.py` and
  `benchmarks/population.py` time the same steps bare.
  """
  layers = runtime.layers(config.runtime.backend, model_config)
  model = models.UNet(model_config, axis_name=parallel.model_axis_name(config.parallel.strategy), layers=layers)
  built = population.Population(config, model, (1, *info.image_shape), population.members(config, model_config), mesh)
  jax.clear_caches()  # the initialiser's executable (50 MB at base 64) is never run again
  return built


class _Preemption:
  """Turns SIGTERM into a flag checked between steps (agreed on by all processes)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    self.requested = True
    if callable(self._previous):  # a caller's own handler (a sweep's: `ablation.runner.sigterm_stops`) hears it too
      self._previous(signum, frame)

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


def _checkpoints(step: int, train) -> bool:
  """Whether the loop checkpoints after `step` (every `train.checkpoint_every` and the last)."""
  return step == train.num_steps or step % train.checkpoint_every == 0


def logged_steps(train) -> list[int]:
  """The steps an uninterrupted run from step 0 logs training metrics at: every
  `train.log_every`, and every step it checkpoints after."""
  return [s for s in range(1, train.num_steps + 1) if _checkpoints(s, train) or s % train.log_every == 0]


def train_and_evaluate(config, workdir: str | pathlib.Path | None = None, *, verbose: bool = True) -> RunResult:
  """Trains, evaluates and checkpoints `config`'s population in `workdir` (resuming what is there).

  A population (`config.population`, `training.population`) of K members trains as one; K = 1
  is an ordinary run. Each member gets its own metrics, TensorBoard events, figures and best
  checkpoint (`population.member_dir`); a member whose loss turns non-finite stops alone (a line
  says which) and the run stops when none is left. To keep peak host memory down it empties
  JAX's compilation caches once, after initialising (`jax.clear_caches()`; the initialiser's
  executable is 50 MB at base 64): functions the calling process compiled before are compiled
  again on their next call, with the same results.

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
  config = with_resolved_data(config, resolved)
  members = population.members(config, model_config)
  count = len(members)
  lead = jax.process_index() == 0
  if workdir:
    workdir = pathlib.Path(workdir)
  else:
    workdir = default_workdir(resolved)
    if lead:
      _link_latest(workdir)
  mesh = parallel.make_mesh(member_shards=config.parallel.member_shards)
  parallel.check_batch_size(config.train.batch_size, mesh)
  if config.train.num_steps < 1:
    raise UserError(f'train.num_steps={config.train.num_steps} must be at least 1')
  heads = model_config.depth if model_config.deep_supervision else 1
  try:
    losses.deep_supervision_weights(heads, losses.LossWeights.from_config(config.train).deep_supervision)
  except ValueError as e:
    raise UserError(str(e)) from None

  ckpt = checkpoint.Checkpoints(
    workdir / 'checkpoints', keep=config.train.keep_checkpoints, best_metrics=[m.best_metric for m in members]
  )
  _check_same_model(ckpt.read_config(), resolved, workdir)
  files = {'config': workdir / 'config.json', 'checkpoints': workdir / 'checkpoints'}
  if lead:
    try:
      files['config'].write_text(json.dumps(resolved, indent=2, sort_keys=True))
    except OSError as e:
      raise ckpt.write_error(files['config'].name, e) from e

  members_run = build_population(config, model_config, info, mesh)
  schedules = [state_lib.make_schedule(population.member_config(config, m).train) for m in members]
  per_process = config.train.batch_size // jax.process_count()
  seeds = sorted({m.seed for m in members})  # one input pipeline per seed; members of a seed share its batches
  iterators = [
    iter(data.make_pipeline(config.data, 'train', batch_size=per_process, seed=seed, train=True)) for seed in seeds
  ]
  feeds = [seeds.index(m.seed) for m in members]
  restored, restored_step = ckpt.restore(members_run.abstract(), iterators)
  if restored is not None:
    members_run.restore(restored)
    logging.info('resumed from step %d in %s', restored_step, workdir)

  directories = [population.member_dir(workdir, m, count) for m in members]
  writers = []
  for directory in directories:
    if lead:
      directory.mkdir(parents=True, exist_ok=True)
    writers.append(reporting.MetricWriter(directory, enabled=lead))
  if lead and count > 1:
    for member, directory in zip(members, directories, strict=True):
      (directory / 'member.json').write_text(json.dumps({**dataclasses.asdict(member), 'label': member.label}))

  def log(index: int, step: int, split: str, values: dict) -> None:
    try:
      writers[index].write(step, split, values)
    except OSError as e:
      raise ckpt.write_error(writers[index].jsonl.name, e) from e

  if count == 1:
    files.update(metrics=writers[0].jsonl, tensorboard=writers[0].tensorboard_dir)
  else:
    files['members'] = workdir / 'members'
  preemption = _Preemption()
  step = members_run.step
  validation: list[dict] = [{} for _ in members]
  samples: list | None = None
  keep = config.train.num_sample_images
  last_time, last_step = time.perf_counter(), step
  lost_peer = False
  reported = set(members_run.stopped)  # stopped members already reported (by an earlier process too)
  try:
    bar, live = reporting.progress_bar(
      show=lead, total=config.train.num_steps, initial=step, leave=verbose, unit='step', dynamic_ncols=True
    )
    with bar:
      while step < config.train.num_steps:
        host = [next(iterator) for iterator in iterators]
        members_run.train([host[feed] for feed in feeds], config.train.batch_size)
        step += 1
        bar.update(1)
        final = step == config.train.num_steps
        stop = preemption.should_stop(step, config.train.log_every)
        save = stop or _checkpoints(step, config.train)
        if save or step % config.train.log_every == 0:
          _check_stopped(members_run, members, reported, ckpt, lead)
          values = members_run.last_metrics()
          now = time.perf_counter()
          rate = (step - last_step) * config.train.batch_size / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          running = [m.index for m in members if m.index not in reported]
          for index in running:
            record = {name: value[index] for name, value in values.items()}
            record['learning_rate'] = schedules[index](step - 1)  # the rate this step's update used
            record['images_per_sec'] = rate
            log(index, step, 'train', record)
          postfix = {
            'loss': f'{np.mean(values["loss"][running]):.4f}',
            'dice': f'{np.mean(values["dice"][running]):.3f}',
            'img_s': f'{rate * len(running):.1f}',
          }
          if count > 1:
            postfix['members'] = f'{len(running)}/{count}'
          bar.set_postfix(postfix)
          if lead and verbose and not live:
            shown = ', '.join(f'{k} {v}' for k, v in postfix.items())
            reporting.progress_line(f'step {step}/{config.train.num_steps}: {shown}')
        evaluated = None
        if final or step % config.train.eval_every == 0:
          validation, samples = _evaluate(members_run, config, mesh, keep if final else 0)
          evaluated = {}
          for member, values in zip(members, validation, strict=True):
            log(member.index, step, 'validation', values)
            evaluated[member.best_metric] = values['dice']
            if verbose:
              who = '' if count == 1 else f' member {member.index} ({member.label})'
              bar.write(f'step {step}:{who} validation ' + ', '.join(f'{k} {v:.4f}' for k, v in values.items()))
          last_time = time.perf_counter()  # Evaluation time is not training throughput.
        if save:
          ckpt.save(step, members_run.stacked(), iterators, resolved, metrics=evaluated)
        if stop and not final:
          ckpt.wait()
          return RunResult(step, validation, files, members, stopped=True)
    ckpt.wait()
    if samples is None:  # Resumed a finished run: evaluate it once more for the report.
      validation, samples = _evaluate(members_run, config, mesh, keep)
    if lead:
      for member, directory, writer in zip(members, directories, writers, strict=True):
        figures = _write_figures(samples[member.index], directory, writer)
        if count == 1:
          files.update(figures)
    return RunResult(step, validation, files, members)
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
    for writer in writers:
      writer.close()
    if not lost_peer:  # closing waits on the other processes
      ckpt.close()


def _evaluate(members_run: population.Population, config, mesh, keep: int) -> tuple[list[dict], list[dict]]:
  """Each member's validation summary and up to `keep` sample predictions."""
  summaries, samples = [], []
  for member_state in members_run.member_states():
    per_image, member_samples = evaluation.evaluate_split(
      members_run.eval_fn,
      member_state,
      config.data,
      mesh,
      batch_size=config.train.batch_size,
      boundary_tolerance=config.train.boundary_tolerance,
      keep=keep,
    )
    summaries.append(evaluation.summarize(per_image))
    samples.append(member_samples)
  return summaries, samples


def _check_stopped(members_run, members, reported: set, ckpt, lead: bool) -> None:
  """Reports members that stopped since the last check; raises when none is left."""
  stopped_at = members_run.stopped_at()
  members_run.stopped = {i for i, at in enumerate(stopped_at) if at}
  if len(members_run.stopped) == len(members):
    ckpt.wait()
    kept = ckpt.steps()
    last = f'step {kept[-1]} in {ckpt.directory}' if kept else f'none in {ckpt.directory}'
    which = (
      f'at step {stopped_at[0]}'
      if len(members) == 1
      else 'in every member (' + ', '.join(f'member {i} at step {at}' for i, at in enumerate(stopped_at)) + ')'
    )
    raise NonFiniteLossError(
      f'loss became non-finite {which}; the last good checkpoint is {last}; lower train.learning_rate or check the data'
    )
  for index in sorted(members_run.stopped - reported):
    reported.add(index)
    if lead:
      reporting.progress_line(
        f'member {index} ({members[index].label}) stopped at step {stopped_at[index]}: its loss became non-finite; '
        f'its last finite state is kept and {len(members) - len(reported)} other members train on'
      )


def _write_figures(samples: dict, workdir: pathlib.Path, writer) -> dict:
  """Sample predictions (none for `train.num_sample_images=0`) and learning curves."""
  paths = {'predictions': workdir / 'predictions.png', 'learning_curves': workdir / 'learning_curves.png'}
  if len(samples['image']):
    reporting.plot_predictions(samples['image'], samples['mask'], samples['prediction'], paths['predictions'])
  else:
    del paths['predictions']
  if writer.jsonl.exists():
    reporting.plot_learning_curves(writer.jsonl, paths['learning_curves'])
  return paths


def describe(result: RunResult) -> str:
  """The end-of-run summary: where each artefact went and the final validation metrics."""
  lines = [f'{"stopped by SIGTERM at" if result.stopped else "finished at"} step {result.step}']
  lines += [f'  {name:<16} {path}' for name, path in result.files.items()]
  for member, values in zip(result.members, result.validation, strict=True):
    if values:
      who = '' if len(result.members) == 1 else f'member {member.index} ({member.label}) '
      lines.append(f'{who}validation: ' + ', '.join(f'{k} {v:.4f}' for k, v in values.items()))
  return '\n'.join(lines)
