"""The base experiment config (every default, once) and how a model config is resolved from it.

Experiment files in `experiments/configs/` start from `base_config()` and override what they
change. Sections: `seed`, `preset`, `model` (ModelConfig fields; None = the preset's value),
`data` (`resunet_jax.data.default_config`), `train`, `parallel`, `population` (members trained
as one, `resunet_jax.training.population`), `runtime` (the layer set and how members are
mapped, `resunet_jax.runtime`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections
from ml_collections import config_dict

from resunet_jax import data, models, runtime
from resunet_jax.errors import UserError


def model_section() -> ml_collections.ConfigDict:
  """A `config.model` section: every `ModelConfig` field as a typed placeholder (None).

  None means "the preset's value"; a value set in a config file or by `--config.model.F=V`
  overrides the preset named by `config.preset` (`--model`).
  """
  return ml_collections.ConfigDict(
    {f.name: config_dict.placeholder(type(f.default)) for f in dataclasses.fields(models.ModelConfig)}
  )


def train_section() -> ml_collections.ConfigDict:
  """The `config.train` section with its defaults."""
  c = ml_collections.ConfigDict()
  c.batch_size = 16  # global, over all devices and processes
  c.num_steps = 1000
  c.log_every = 10
  c.eval_every = 250
  c.checkpoint_every = 250
  c.keep_checkpoints = 2  # latest kept; the best by validation Dice is kept besides
  c.optimizer = 'adamw'  # adamw | sgd
  c.learning_rate = 1e-3
  c.warmup_steps = 50
  c.final_lr_fraction = 0.01  # cosine decay ends at learning_rate * this
  c.weight_decay = 1e-4
  c.momentum = 0.9  # sgd only
  c.grad_clip = 1.0  # global-norm clipping; 0 disables
  c.ema_decay = 0.0  # EMA of weights for evaluation; 0 disables
  c.cross_entropy_weight = 1.0
  c.dice_weight = 1.0  # soft Dice, or Tversky's index with these weights of false positives and negatives:
  c.tversky_alpha = 0.5
  c.tversky_beta = 0.5
  c.focal_weight = 0.0  # focal loss (Lin et al. 2017); Dice + focal: cross_entropy_weight=0, focal_weight=1
  c.focal_gamma = 2.0
  c.cldice_weight = 0.0  # soft clDice (Shit et al. 2021), for thin structures
  c.cldice_iterations = 3  # soft-skeleton iterations: at least the thickest structure's radius in pixels
  # Deeply supervised models (model.deep_supervision): one loss weight per head, the main head
  # first; () is nnU-Net's halving (losses.deep_supervision_weights).
  c.deep_supervision_weights = ()
  c.boundary_tolerance = 2.0  # pixels, for boundary F1
  c.num_sample_images = 4  # rows of the predictions figure; 0: no figure
  return c


def population_section() -> ml_collections.ConfigDict:
  """The `config.population` section with its defaults (one member: an ordinary run)."""
  c = ml_collections.ConfigDict()
  c.seeds = 1  # members' seeds: config.seed, config.seed + 1, ...
  c.learning_rates = ()  # peak learning rates; () is (train.learning_rate,)
  c.weight_decays = ()  # () is (train.weight_decay,)
  # multipliers on every block's residual shortcut (model.residual=True only); () trains at 1
  # without the input; 0 makes the member the plain model (training.population.stand_in_reason)
  c.residual_scales = ()
  return c


def parallel_section() -> ml_collections.ConfigDict:
  """The `config.parallel` section: step strategy and multi-host start-up."""
  c = ml_collections.ConfigDict()
  c.strategy = 'jit'  # jit | pmap
  c.distributed = 'none'  # none | auto (jax.distributed.initialize() from the environment)
  c.coordinator_address = config_dict.placeholder(str)  # e.g. 10.0.0.1:1234: explicit start-up
  c.num_processes = 1
  c.process_id = 0
  # A process silent this long counts as dead and the others stop (jax.distributed's default).
  c.heartbeat_timeout_s = 100
  c.member_shards = 1  # devices along the mesh's `members` axis (a vmapped population's members split over them)
  return c


def base_config() -> ml_collections.ConfigDict:
  """The full default config."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.preset = 'resunet'  # set by --model
  config.model = model_section()
  config.data = data.default_config()
  config.train = train_section()
  config.parallel = parallel_section()
  config.population = population_section()
  config.runtime = runtime.section()
  return config


def resolve_model(preset: str, section: Any, num_classes: int | None = None) -> models.ModelConfig:
  """The preset with every non-None entry of the model section applied over it.

  Args:
    preset: a `models.PRESETS` name.
    section: the `config.model` section (or a dict).
    num_classes: used when the section leaves `num_classes` None (the dataset's outputs).

  Raises:
    UserError: unknown preset, unknown field or invalid value (one line, with the valid names).
  """
  overrides = {key: value for key, value in dict(section).items() if value is not None}
  if num_classes is not None:
    overrides.setdefault('num_classes', num_classes)
  try:
    return models.preset(preset, **overrides)
  except ValueError as e:
    raise UserError(str(e)) from None


# Keys that say where or how fast a run executes, not what it computes. They are left out of the
# hash, so that changing one (or adding one) neither forks a run's default workdir nor re-runs a
# finished sweep, and so that the processes of a multi-process run agree on it. A section named
# with None is left out whole.
PLACEMENT_KEYS = {
  'runtime': None,
  'model': ('conv',),  # where configs written before runtime.backend kept the backend
  'data': ('data_dir', 'read_threads', 'prefetch', 'num_workers'),
  'parallel': (
    'distributed',
    'coordinator_address',
    'num_processes',
    'process_id',
    'heartbeat_timeout_s',
    'member_shards',
  ),
}


# Keys added after runs were recorded, with the value every earlier run had: a key at that value
# is left out of the hash, so earlier runs keep their hashes (and finished sweeps their results).
ADDED_KEYS = {
  'model': {
    'shortcut': 'projection',
    'init': 'lecun',
    'skip_kind': 'concat',
    'deep_supervision': False,
    'spatial_dims': 2,
    'pool_strides': [],
    'width_scale': 1.0,
  },
  'train': {
    'deep_supervision_weights': [],
    'tversky_alpha': 0.5,
    'tversky_beta': 0.5,
    'focal_weight': 0.0,
    'focal_gamma': 2.0,
    'cldice_weight': 0.0,
    'cldice_iterations': 3,
  },
  'data': {
    'channels': 3,
    'normalization': 'fixed',
    'stats': None,
    'patch_size': None,
    'foreground_oversampling': 1 / 3,
    'evaluation': 'resize',
    'folder_layout': None,
    'folder_hint': '',
    'spacing': None,
  },
}


# Added keys that an unresolved config (a config file's model section of overrides, None where
# unset) did not have either: None there is their earlier state too.
UNSET_ADDED_KEYS = {'model': ('spatial_dims', 'pool_strides', 'width_scale')}


def _same(value, earlier) -> bool:
  """Equal as JSON (a tuple in a fresh config, a list once read back from config.json)."""
  return json.dumps(value, default=str) == json.dumps(earlier, default=str)


def config_hash(resolved: dict) -> str:
  """A short stable hash of a resolved config: what makes two runs the same run.

  Args:
    resolved: the resolved config dict (what config.json holds). `PLACEMENT_KEYS` are ignored,
      and so are `ADDED_KEYS` at their earlier value (`UNSET_ADDED_KEYS` also when None).
  """
  what = {}
  for section, values in resolved.items():
    left_out = PLACEMENT_KEYS.get(section, ())
    if left_out is None:
      continue
    added = ADDED_KEYS.get(section, {})
    if left_out or added:
      unset = UNSET_ADDED_KEYS.get(section, ())
      values = {
        k: v
        for k, v in values.items()
        if k not in left_out and not (k in added and (_same(v, added[k]) or (k in unset and v is None)))
      }
    what[section] = values
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]
