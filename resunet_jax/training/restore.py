"""Loading a trained run from its workdir: the resolved config and a chosen checkpoint."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import ml_collections

from resunet_jax import models, runtime
from resunet_jax.errors import UserError
from resunet_jax.training import checkpoint, parallel
from resunet_jax.training import state as state_lib


@dataclasses.dataclass
class LoadedRun:
  """A trained model ready for evaluation or prediction.

  Attributes:
    config: the run's resolved config (from config.json).
    model: the `UNet` (no cross-device BatchNorm axis: inference only).
    state: the restored train state, replicated on `mesh`.
    step: the checkpoint's step.
    mesh: the device mesh.
  """

  config: ml_collections.ConfigDict
  model: models.UNet
  state: state_lib.TrainState
  step: int
  mesh: jax.sharding.Mesh

  @property
  def variables(self) -> dict:
    """The variables to predict with (EMA parameters when the run kept them)."""
    return self.state.variables(self.state.eval_params)


def load_run(workdir: str | pathlib.Path, which: str = 'best', backend: str = 'auto') -> LoadedRun:
  """Restores `which` checkpoint of the run in `workdir`.

  Args:
    workdir: a folder written by `experiments/train.py`.
    which: 'best' (highest validation Dice), 'latest', or a step number.
    backend: the layer set to predict with (`runtime.layers`); any restores any run.

  Raises:
    UserError: no such workdir, no config.json, no checkpoints, or no such step.
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
    model_config = models.ModelConfig.from_dict(resolved['model'])
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'{config_path} cannot be read as a run config ({e}); was it edited by hand?') from None
  config = ml_collections.ConfigDict(resolved)
  ckpt = checkpoint.Checkpoints(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
  steps = ckpt.steps()
  if not steps:
    raise UserError(f'{workdir / "checkpoints"} holds no checkpoint; train first, or wait for the first save')
  if which == 'latest':
    step = None
  elif which == 'best':
    step = ckpt.best_step('dice')
    if step is None:
      raise UserError(f'no checkpoint in {workdir} was saved with validation metrics; use --checkpoint=latest')
  elif which.isdigit() and int(which) in steps:
    step = int(which)
  else:
    raise UserError(f"--checkpoint={which} is not 'best', 'latest' or a saved step ({', '.join(map(str, steps))})")

  mesh = parallel.make_mesh()
  model = models.UNet(model_config, layers=runtime.layers(backend))
  optimizer = state_lib.make_optimizer(config.train)
  shape = (1, config.data.image_size, config.data.image_size, 3)

  def init():
    return state_lib.create_train_state(model, optimizer, shape, seed=0, ema_decay=config.train.ema_decay)

  abstract = checkpoint.abstract_like(jax.eval_shape(init), parallel.replicated(mesh))
  state, restored_step = ckpt.restore(abstract, step=step)
  ckpt.close()
  return LoadedRun(config, model, state, restored_step, mesh)
