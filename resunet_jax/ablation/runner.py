"""One experiment as a function, `run(config, root) -> Result`, and a sweep as a map over runs.

`run` trains `config` (the training loop, resuming whatever is in its folder), evaluates the
final weights on the test split, and evaluates apply-time knock-outs of the trained model: all
2**depth skip masks in one vmapped call (2**k for an arm with k skips), and each block's
residual shortcut zeroed. `run_population` does the same for every member of a population
(`grid.populations`: an arm's seeds, and plain/residual pairs, trained as one), each member
giving the `Result` of the run it stands for. The only side effects are folders:
`root/runs/<hash of the run's resolved config>/` ends with the run's `result.json` (and holds its
training when it trained alone); a population trains in `root/populations/<hash>/`. A run whose
`result.json` exists is read back, not trained again, so an interrupted sweep resumes where it
stopped (a run cut off mid-training resumes from its last checkpoint). Given the config and its
seed a run is deterministic (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from resunet_jax import configs, models
from resunet_jax.ablation import grid
from resunet_jax.training import evaluation, loop, parallel, reporting, restore, steps


@dataclasses.dataclass
class Result:
  """What one run of a sweep measured (its `result.json`).

  Attributes:
    run_id: hash of the resolved config (the run's folder name).
    data: dataset name.
    residual: `model.residual`.
    skips: skip string, level 0 first.
    depth: `model.depth`.
    seed: the config's seed.
    num_steps: the training budget.
    test: mean per-image test metrics (`evaluation.METRICS`) of the final weights.
    curve: `(step, validation Dice)` pairs during training.
    gradients: logged training records: `step`, `grad_norm` and `grad_norm/<block>`.
    param_counts: parameters per top-level module.
    knockouts: `{'skip' | 'residual': {'labels': [str], 'scales': [[float]], 'dice': [float]}}`,
      mean test Dice per knock-out row (absent when the model has no such path). Skip labels
      give each level, level 0 first: '1' kept, '0' zeroed, '-' no skip in this arm.
    wall_s: seconds of the call that finished the run.
    extra: what the sweep's `measure` hook returned (`run_population`), e.g. the study's
      `studies/skip_residual/measures.py` (numbers, and lists of per-image values); empty without one.
  """

  run_id: str
  data: str
  residual: bool
  skips: str
  depth: int
  seed: int
  num_steps: int
  test: dict[str, float]
  curve: list[tuple[int, float]]
  gradients: list[dict[str, float]]
  param_counts: dict[str, int]
  knockouts: dict[str, dict[str, list]]
  wall_s: float
  extra: dict[str, float | list[float]] = dataclasses.field(default_factory=dict)

  @classmethod
  def load(cls, path: pathlib.Path) -> Result:
    values = json.loads(pathlib.Path(path).read_text())
    values['curve'] = [tuple(point) for point in values['curve']]
    return cls(**values)

  def save(self, path: pathlib.Path) -> None:
    """Writes atomically: a run is either complete on disk or absent."""
    temporary = path.with_suffix(f'.tmp{os.getpid()}')
    temporary.write_text(json.dumps(dataclasses.asdict(self), indent=1))
    os.replace(temporary, path)


class Stopped(Exception):
  """SIGTERM stopped a sweep: a run cut short before its budget is not measured (rerunning the
  sweep resumes it from its checkpoint); the runs finished before are kept."""


_sigterm = {'requested': False, 'depth': 0}


@contextlib.contextmanager
def sigterm_stops():
  """Within: SIGTERM stops the sweep at the next run boundary (`Stopped` from `run_population`),
  whenever it arrives; during training, the training loop checkpoints and stops at once.

  Nested uses (a study's stages around each stage's sweep) share the outermost one's flag, so a
  SIGTERM between two sweeps, or while a population is measured, stops the next population
  before it trains instead of after.
  """
  if _sigterm['depth']:
    _sigterm['depth'] += 1
    try:
      yield
    finally:
      _sigterm['depth'] -= 1
    return

  def handler(signum, frame):
    del signum, frame
    _sigterm['requested'] = True

  _sigterm.update(requested=False, depth=1)
  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _sigterm.update(requested=False, depth=0)


def skip_masks(depth: int) -> np.ndarray:
  """All `2**depth` skip masks, `[2**depth, depth]` float32: row r keeps level l iff bit l of r is 1."""
  rows = np.arange(2**depth)[:, None]
  return ((rows >> np.arange(depth)[None, :]) & 1).astype(np.float32)


def residual_masks(model: int | models.ModelConfig) -> tuple[list[str], np.ndarray]:
  """Residual knock-outs: none, each block's shortcut zeroed (in `models.block_names` order), all.

  Args:
    model: the network, or a depth (the concat U-Net of that depth).

  Returns:
    Labels and the `[N + 2, N]` float32 scale rows, for the network's N blocks (`2 * depth + 1`
    for a concat U-Net).
  """
  names = models.block_names(models.ModelConfig(depth=model) if isinstance(model, int) else model)
  blocks = len(names)
  rows = np.concatenate([np.ones((1, blocks)), 1 - np.eye(blocks), np.zeros((1, blocks))]).astype(np.float32)
  return ['none', *(f'-{name}' for name in names), 'all'], rows


def knockout_dice(loaded: restore.LoadedRun, role: str, scales: dict[str, np.ndarray]) -> np.ndarray:
  """Mean Dice over the split `role` for each row of `scales` (see `steps.knockout_step`), `[M]`."""
  knockout_fn = parallel.compile_eval(steps.knockout_step, loaded.mesh, extra_args=1)
  scales = jax.tree.map(jnp.asarray, scales)
  rows, valid, ids = [], [], []
  for batch, out in loaded.map_split(knockout_fn, role, args=(scales,)):
    rows.append(out['dice'])
    valid.append(batch['valid'])
    ids.extend(str(i) for i in batch['id'])
  per_image = evaluation.gather_rows({'dice': np.concatenate(rows), 'valid': np.concatenate(valid)}, ids)
  return per_image['dice'].mean(0)


def measure_knockouts(
  loaded: restore.LoadedRun, role: str, model_config: models.ModelConfig, roles: dict[str, str] | None = None
) -> dict[str, dict[str, list]]:
  """The knock-outs of `model_config`'s paths (the arm's: a plain stand-in has no residual ones).

  `skip`: each skip mask with the knocked-out skips zeroed; `residual`: each block's shortcut
  zeroed; `gate` (attention skips): each gate opened to ones, then all; `prune` (a deeply
  supervised UNet++): the head of each pruning level. Each kind holds its `labels`, `scales` and
  the mean Dice per row under every key of `roles` (default `{'dice': role}`: key -> split).
  """
  out: dict[str, dict[str, list]] = {}
  roles = roles or {'dice': role}

  def score(kind, labels, masks, **scales):
    out[kind] = {'labels': labels, 'scales': masks.tolist()}
    out[kind].update({key: knockout_dice(loaded, split, scales).tolist() for key, split in roles.items()})

  present = np.asarray(model_config.skip_levels)
  if present.any():
    masks = skip_masks(model_config.depth)
    masks = masks[(masks[:, ~present] == 1).all(1)]  # a level without a skip ignores its scale
    labels = [''.join(('1' if v else '0') if p else '-' for v, p in zip(row, present, strict=True)) for row in masks]
    score('skip', labels, masks, skip_scale=masks)
  if model_config.skip_kind == 'attention' and present.any():  # each gate opened to ones: the plain skip there
    levels = np.flatnonzero(present)
    opened = np.zeros((len(levels) + 2, model_config.depth), np.float32)
    opened[np.arange(len(levels)) + 1, levels] = 1.0
    opened[-1, levels] = 1.0
    score('gate', ['none', *(f'-gate {level}' for level in levels), 'all'], opened, gate_open=opened)
  if model_config.skip_kind == 'nested' and model_config.deep_supervision:  # Zhou et al.'s pruned sub-networks
    levels = np.arange(1, model_config.depth + 1, dtype=np.int32)
    score('prune', [f'depth {level}' for level in levels], levels[:, None], prune_level=levels)
  if model_config.residual:
    labels, masks = residual_masks(model_config)
    score('residual', labels, masks, residual_scale=masks)
  return out


def run_dir(config, root: str | pathlib.Path) -> pathlib.Path:
  """The folder of `config`'s run under a sweep `root`: `root/runs/<hash of the resolved config>`."""
  _, _, resolved = loop.resolve(config)
  return pathlib.Path(root) / 'runs' / configs.config_hash(resolved)


def _population_dir(config, root: pathlib.Path) -> pathlib.Path:
  _, _, resolved = loop.resolve(config)
  return pathlib.Path(root) / 'populations' / configs.config_hash(resolved)


def run(config, root: str | pathlib.Path, *, test_split: str = 'test') -> Result:
  """Trains and measures one experiment config, or reads back its finished result.

  Args:
    config: an experiment config (no `ablation` section), e.g. a `RunSpec.config`.
    root: the sweep folder; the run lives in `run_dir(config, root)`.
    test_split: the split of the final metrics and the knock-outs.

  Returns:
    The run's `Result` (also in `result.json` of its folder).
  """
  return run_population(config, [config], root, test_split=test_split)[0]


def _read(path: pathlib.Path) -> Result | None:
  if not path.exists():
    return None
  try:
    return Result.load(path)
  except (ValueError, KeyError, TypeError) as e:
    logging.warning('%s is unreadable (%s); measuring the run again', path, e)
    return None


def run_population(
  config,
  runs: list,
  root: str | pathlib.Path,
  *,
  test_split: str | None = 'test',
  knockouts=True,
  measure=None,
) -> list[Result]:
  """Trains `config`'s population and measures each member as the run it stands for.

  Args:
    config: an experiment config whose population has `len(runs)` members (one: an ordinary
      config, trained in its own run folder).
    runs: member i's run config (a `RunSpec.config`): its folder receives the `result.json`, its
      model is what the member is measured as (a plain arm's knock-outs and parameter counts).
    root: the sweep folder.
    test_split: the split of the final metrics and the knock-outs; None: neither (`Result.test`
      empty), for runs whose final validation metrics (`Result.curve`) are all a study needs.
    knockouts: True measures `measure_knockouts(loaded, test_split, model)` of each member, a function of
      the same arguments measures what it returns (a study's own kinds), False none.
    measure: None, or `measure(loaded, run_config) -> dict[str, float]` (the member's
      `restore.LoadedRun` of its final weights), stored as `Result.extra`.

  Returns:
    One `Result` per member (read back where every member's `result.json` exists).

  Raises:
    Stopped: SIGTERM ended the training early (its checkpoint is saved; no result is written).
  """
  root = pathlib.Path(root)
  knockout_fn = knockouts if callable(knockouts) else measure_knockouts if knockouts and test_split else None
  paths = [run_dir(run_config, root) / 'result.json' for run_config in runs]
  finished = [_read(path) for path in paths]
  if all(finished):
    return finished
  workdir = paths[0].parent if len(runs) == 1 else _population_dir(config, root)
  if _sigterm['requested']:  # arrived while an earlier population was measured: train nothing more
    raise Stopped(f'stopped by SIGTERM before training {workdir}; rerun the same command to resume')
  start = time.perf_counter()
  trained = loop.train_and_evaluate(config, workdir, verbose=False)
  if trained.stopped or _sigterm['requested']:  # a run cut short is not a result: measured once at its budget
    raise Stopped(f'stopped by SIGTERM at step {trained.step} of {workdir}; rerun the same command to resume')
  if len(trained.members) != len(runs):
    raise ValueError(f'the population has {len(trained.members)} members for {len(runs)} runs')
  results = []
  for member, run_config, path in zip(trained.members, runs, paths, strict=True):
    member_start = time.perf_counter()
    # the final weights: the same budget for every arm
    loaded = restore.load_run(workdir, 'latest', config.runtime.backend, member=member.index)
    per_image = loaded.evaluate(test_split) if test_split else {}
    records = reporting.read_metrics(loaded.directory / 'metrics.jsonl')
    arm_model, _, _ = loop.resolve(run_config)
    params = {name: p for name, p in loaded.state.params.items()}
    counts = {
      name: models.count_params(p if arm_model.residual else {k: v for k, v in p.items() if k != 'conv_proj'})
      for name, p in params.items()
    }
    result = Result(
      run_id=path.parent.name,
      data=run_config.data.name,
      residual=arm_model.residual,
      skips=''.join('1' if s else '0' for s in arm_model.skip_levels),
      depth=arm_model.depth,
      seed=int(run_config.seed),
      num_steps=int(run_config.train.num_steps),
      test={name: float(np.mean(per_image[name])) for name in evaluation.METRICS if name in per_image},
      curve=[(r['step'], r['dice']) for r in records if r['split'] == 'validation'],
      gradients=[
        {k: v for k, v in r.items() if k == 'step' or k.startswith('grad_norm')}
        for r in records
        if r['split'] == 'train'
      ],
      param_counts=counts,
      knockouts=knockout_fn(loaded, test_split, arm_model) if knockout_fn else {},
      wall_s=0.0,
      extra=measure(loaded, run_config) if measure else {},
    )
    result.wall_s = (member_start - start) / len(runs) + time.perf_counter() - member_start  # its share of training
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      result.save(path)
    results.append(result)
  return results


def use_compilation_cache(directory: pathlib.Path) -> None:
  # Seeds of one arm compile the same programs: JAX's persistent cache turns the second and
  # later compilations into a disk read (about 5 s -> 1 s per step function on a 2-core CPU).
  # A cache the user configured already (JAX_COMPILATION_CACHE_DIR) is kept; else one in the sweep.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def sweep(config, root: str | pathlib.Path, *, progress: bool = True) -> list[tuple[grid.RunSpec, Result]]:
  """Runs (or reads back) every run of an ablation config, with a progress display.

  Runs are trained in populations where that is exact (`grid.populations`, unless
  `ablation.populations` is False).

  Args:
    config: an ablation config (`grid.section()` in `config.ablation`).
    root: the sweep folder.
    progress: show runs done, the current population and the ETA.

  Returns:
    `(spec, result)` for every run, in `grid.run_specs` order.

  Raises:
    Stopped: on SIGTERM (the runs finished before it are kept).
  """
  root = pathlib.Path(root)
  specs = grid.run_specs(config)
  groups = grid.populations(specs, group=config.ablation.populations)
  root.mkdir(parents=True, exist_ok=True)
  if config.ablation.compilation_cache:
    use_compilation_cache(root / 'compilation_cache')
  done = {spec: (run_dir(spec.config, root) / 'result.json').exists() for spec in specs}
  show = progress and jax.process_index() == 0
  finished = sum(done.values())
  if show:
    print(
      f'sweep of {len(specs)} runs in {len(groups)} populations in {root}: '
      f'{finished} already done, {len(specs) - finished} to run'
    )
  bar, live = reporting.progress_bar(show=show, total=len(specs), initial=finished, unit='run')
  measured: dict[grid.RunSpec, Result] = {}
  with bar, sigterm_stops():
    for count, group in enumerate(groups, start=1):
      todo = [spec for spec in group.runs if not done[spec]]
      first = group.runs[0]
      what = f'{first.study} {first.arm}' + ('' if len(group.runs) == 1 else f' and {len(group.runs) - 1} more')
      if todo:
        bar.set_postfix_str(f'{what}, seeds {sorted({s.seed for s in group.runs})}')
      results = run_population(
        group.config, [spec.config for spec in group.runs], root, test_split=config.ablation.test_split
      )
      measured.update(zip(group.runs, results, strict=True))
      if todo:
        bar.update(len(todo))
        if show and not live:
          reporting.progress_line(f'population {count}/{len(groups)} done: {what} ({len(group.runs)} runs)')
  return [(spec, measured[spec]) for spec in specs]
