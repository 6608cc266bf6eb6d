"""Loading a trained run from its workdir: the resolved config and a chosen checkpoint."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import ml_collections

from resunet_jax import configs, models, runtime
from resunet_jax.errors import UserError
from resunet_jax.training import checkpoint, evaluation, parallel, population, steps
from resunet_jax.training import state as state_lib  # noqa: F401 (LoadedRun.state's type)


@dataclasses.dataclass
class LoadedRun:
  """A trained model ready for evaluation or prediction.

  Attributes:
    config: the member's config: its run alone (`population.member_config` of config.json).
    model: the `UNet` (no cross-device BatchNorm axis: inference only).
    state: the member's restored train state, replicated on `mesh`.
    step: the checkpoint's step.
    mesh: the device mesh.
    member: the population member (member 0 of an ordinary run).
    directory: the member's folder (`population.member_dir`: the workdir of an ordinary run).
  """

  config: ml_collections.ConfigDict
  model: models.UNet
  state: state_lib.TrainState
  step: int
  mesh: jax.sharding.Mesh
  member: population.Member
  directory: pathlib.Path

  @property
  def variables(self) -> dict:
    """The variables to predict with (EMA parameters when the run kept them)."""
    return self.state.variables(self.state.eval_params)

  def apply(self, variables: dict, images: jax.Array) -> jax.Array:
    """Logits of `images` `[N, H, W, C]` in inference mode, with the member's train-time scales."""
    return self.model.apply(variables, images, train=False, **self.state.scales)

  def map_split(self, fn, role: str, args: tuple = ()):
    """`evaluation.map_split` of a `parallel.compile_eval` function over the split `role`, at the run's batch size."""
    batch_size = self.config.train.batch_size
    return evaluation.map_split(
      fn, self.state, self.config.data, self.mesh, role=role, batch_size=batch_size, args=args
    )

  def evaluate(self, role: str, eval_fn=None) -> dict:
    """`evaluation.evaluate_split`'s per-image metrics of the split `role` under the run's settings.

    Args:
      role: 'validation' | 'test' | 'train' (or a raw split string).
      eval_fn: a compiled `steps.eval_step`; None compiles one on the run's mesh.
    """
    eval_fn = eval_fn or parallel.compile_eval(steps.eval_step, self.mesh)
    train = self.config.train
    per_image, _ = evaluation.evaluate_split(
      eval_fn,
      self.state,
      self.config.data,
      self.mesh,
      batch_size=train.batch_size,
      boundary_tolerance=train.boundary_tolerance,
      role=role,
    )
    return per_image


def load_run(
  workdir: str | pathlib.Path,
  which: str = 'best',
  backend: str = 'auto',
  member: int = 0,
  prune_level: int | None = None,
) -> LoadedRun:
  """Restores one member of `which` checkpoint of the run in `workdir`.

  Args:
    workdir: a folder written by `experiments/train.py`.
    which: 'best' (the member's highest validation Dice), 'latest', or a step number.
    backend: the layer set to predict with (`runtime.layers`); any restores any run.
    member: the population member (0 for an ordinary run).
    prune_level: a deeply supervised UNet++ ('unet_plusplus') only: load its sub-network of
      this depth (`models.prune`: the model and its variables alone, no optimizer state).

  Raises:
    UserError: no such workdir, no config.json, no checkpoints, no such step or member, or a
      pruning level the model does not have.
  """
  workdir = pathlib.Path(workdir)
  config_path = workdir / 'config.json'
  if not workdir.is_dir():
    raise UserError(f'workdir {workdir} does not exist; pass the --workdir of a training run')
  if not config_path.is_file():
    raise UserError(f'{config_path} is missing: {workdir} is not a training workdir (experiments/train.py writes it)')
  try:
    resolved = json.loads(config_path.read_text())
    resolved['model'].pop('conv', None)  # runs before runtime.backend kept the backend here
    resolved['data'] = {**configs.ADDED_KEYS['data'], **resolved['data']}  # runs before data.channels: RGB
    if 'population' not in resolved:
      raise UserError(
        f'{workdir} was trained before populations (2026-12-02): its checkpoints hold an older optimizer state; '
        'train it again with the same command'
      )
    model_config = models.ModelConfig.from_dict(resolved['model'])
    config = ml_collections.ConfigDict(resolved)
    members = population.members(config, model_config)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f'{config_path} cannot be read as a run config ({e}); was it edited by hand?') from None
  if not 0 <= member < len(members):
    raise UserError(f'--member={member} is not a member of {workdir}: it has {len(members)} (0 to {len(members) - 1})')
  chosen = members[member]
  ckpt = checkpoint.Checkpoints(
    workdir / 'checkpoints', keep=config.train.keep_checkpoints, best_metrics=[m.best_metric for m in members]
  )
  steps = ckpt.steps()
  if not steps:
    raise UserError(f'{workdir / "checkpoints"} holds no checkpoint; train first, or wait for the first save')
  if which == 'latest':
    step = None
  elif which == 'best':
    step = ckpt.best_step(chosen.best_metric)
    if step is None:
      raise UserError(f'no checkpoint in {workdir} was saved with validation metrics; use --checkpoint=latest')
  elif which.isdigit() and int(which) in steps:
    step = int(which)
  else:
    raise UserError(f"--checkpoint={which} is not 'best', 'latest' or a saved step ({', '.join(map(str, steps))})")

  mesh = parallel.make_mesh()
  model = models.UNet(model_config, layers=runtime.layers(backend, model_config))
  side = config.data.patch_size if model_config.spatial_dims == 3 else config.data.image_size
  shape = (1, *(side,) * model_config.spatial_dims, config.data.channels)
  init, args = population.init_fn(config, model, shape, members)
  abstract = checkpoint.abstract_like(jax.eval_shape(init, *args), parallel.replicated(mesh))
  stacked, restored_step = ckpt.restore(abstract, step=step)
  ckpt.close()
  state = jax.jit(population.member_state, static_argnums=1)(stacked, member)
  directory = population.member_dir(workdir, chosen, len(members))
  if prune_level is not None:
    model, state = _pruned(model, state, prune_level)
  return LoadedRun(population.member_config(config, chosen), model, state, restored_step, mesh, chosen, directory)


def _pruned(model: models.UNet, state: state_lib.TrainState, level: int) -> tuple[models.UNet, state_lib.TrainState]:
  """The UNet++ sub-network of depth `level` and a state holding its variables alone."""
  if state.scales:
    raise UserError(
      f'--prune_level: this member trains with apply-time scales ({", ".join(state.scales)}), '
      'which its pruned sub-network does not have; predict with the whole network'
    )
  try:
    sub, variables = models.prune(model.config, state.variables(), level)
    ema = models.prune(model.config, {'params': state.ema_params}, level)[1]['params'] if state.ema_params else {}
  except ValueError as e:
    raise UserError(f'--prune_level={level}: {e}') from None
  pruned = models.UNet(sub, layers=model.layers)
  state = state.replace(
    apply_fn=pruned.apply,
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    ema_params=ema,
    opt_state=None,  # inference only: training the sub-network would start its optimizer afresh
  )
  return pruned, state
