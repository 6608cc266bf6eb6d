"""Ablations as pure config transforms, and the grid of runs an ablation config describes.

An ablation config is an experiment config (`resunet_jax.configs.base_config`) plus an
`ablation` section (`section()`): seeds, the report's settings, and named studies. A study is
one dataset and the product of its `residual` x `skips` x `depths` x `skip_kinds` x
`deep_supervision` values; `run_specs` expands
every study and seed into the configs of single training runs, each of which
`experiments/train.py` would also accept (the `ablation` section is dropped from them).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import ml_collections

from resunet_jax import configs
from resunet_jax.errors import UserError
from resunet_jax.training import population

SKIP_KEYWORDS = ('all', 'none', 'drop_each')


def section() -> ml_collections.ConfigDict:
  """The `config.ablation` section with its defaults (studies are added by config files)."""
  c = ml_collections.ConfigDict()
  c.seeds = 3  # seeds 0 .. seeds-1 for every arm; 95% t-intervals over them
  c.target_dice = 0.5  # validation Dice whose first crossing measures convergence (claim 1)
  c.test_split = 'test'  # final metrics and knock-outs; validation drives the curves
  c.compilation_cache = True  # reuse compiled steps across seeds ($JAX_COMPILATION_CACHE_DIR, else in the sweep dir)
  c.populations = True  # train the seeds (and plain/residual pairs) of an arm as one population where exact
  # Folder of the report, CSVs and figures ('': the workdir); e.g. a study's results/ folder, committed.
  c.output = ''
  c.studies = ml_collections.ConfigDict()
  return c


def cpu_config() -> ml_collections.ConfigDict:
  """The experiment settings the CPU-sized grids share, with an empty `ablation` section.

  64x64 inputs (use the `size64` datasets, rendered at that size so 1 px structures remain),
  the note's depth 4 with base width 8 instead of 64, and the same budget for every arm: 300
  steps of batch 16 (4,800 images). About 50 s per run on a 2-core CPU.
  """
  config = configs.base_config()
  config.preset = 'unet'  # `residual` is switched per arm
  config.model.base_width = 8
  config.data.image_size = 64
  config.train.batch_size = 16
  config.train.num_steps = 300
  config.train.eval_every = 50
  config.train.checkpoint_every = 100
  config.train.warmup_steps = 20
  config.train.learning_rate = 3e-3
  config.train.num_sample_images = 2
  config.ablation = section()
  return config


def study(
  data: str,
  *,
  residual: Sequence[bool] = (False, True),
  skips=('all',),
  depths=(),
  skip_kinds: Sequence[str] = ('concat',),
  deep_supervision: Sequence[bool] = (False,),
) -> ml_collections.ConfigDict:
  """One study of an ablation config.

  Args:
    data: the dataset (`config.data.name`), e.g. 'synthetic_roads/size64'.
    residual: values of `model.residual` to train.
    skips: skip variants: 'all', 'none', 'drop_each' (one arm per level, that level's skip
      removed) or explicit `ModelConfig.skips` strings such as '1011'.
    depths: values of `model.depth`; empty means the experiment config's (or preset's) depth.
    skip_kinds: values of `model.skip_kind` ('concat', 'attention', 'nested').
    deep_supervision: values of `model.deep_supervision`.
  """
  return ml_collections.ConfigDict(
    {
      'data': data,
      'residual': tuple(residual),
      'skips': tuple(skips),
      'depths': tuple(depths),
      'skip_kinds': tuple(skip_kinds),
      'deep_supervision': tuple(bool(d) for d in deep_supervision),
    }
  )


def ablate(config: ml_collections.ConfigDict, **model_fields: Any) -> ml_collections.ConfigDict:
  """A copy of `config` with `model` fields set (e.g. `skips='none'`, `residual=True`).

  Pure: `config` is not changed. The result is validated (an unknown field or a bad value
  raises `UserError`), so a grid fails before any training.
  """
  ablated = config.copy_and_resolve_references()
  for name, value in model_fields.items():
    if name not in ablated.model:
      configs.resolve_model(config.preset, {name: value})  # raises with the valid names
    ablated.model[name] = value
  configs.resolve_model(ablated.preset, ablated.model)
  return ablated


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of a sweep.

  Attributes:
    study: the study's name.
    arm: the arm's name, e.g. 'plain-all', 'residual-drop2', 'plain-all-d5'.
    seed: the run's seed.
    residual: `model.residual`.
    skips: the skip string, level 0 first ('1111', '1011', ...).
    depth: `model.depth`.
    config: the run's experiment config (no `ablation` section).
    skip_kind: `model.skip_kind`.
    deep_supervision: `model.deep_supervision`.
  """

  study: str
  arm: str
  seed: int
  residual: bool
  skips: str
  depth: int
  config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)
  skip_kind: str = 'concat'
  deep_supervision: bool = False

  @property
  def variant(self) -> str:
    """The skip path besides the plain concatenation, as arm names end: '' (concat), 'attention',
    'nested', 'ds' (deep supervision), 'nested-ds'."""
    return variant_name(self.skip_kind, self.deep_supervision)


def variant_name(skip_kind: str, deep_supervision: bool) -> str:
  """`RunSpec.variant` of a skip kind and deep-supervision setting."""
  parts = ([] if skip_kind == 'concat' else [skip_kind]) + (['ds'] if deep_supervision else [])
  return '-'.join(parts)


def _skip_variants(variant: str, depth: int) -> list[tuple[str, str]]:
  """(arm suffix, skip string) pairs for one `skips` entry of a study."""
  if variant == 'all':
    return [('all', '1' * depth)]
  if variant == 'none':
    return [('none', '0' * depth)]
  if variant == 'drop_each':
    return [(f'drop{level}', ''.join('0' if i == level else '1' for i in range(depth))) for level in range(depth)]
  if variant and set(variant) <= {'0', '1'}:
    if len(variant) != depth:
      raise UserError(f"skips '{variant}' has {len(variant)} levels but depth is {depth}; give one 0/1 per level")
    return [(variant, variant)]
  raise UserError(f"skip variant '{variant}' is not valid; use {', '.join(SKIP_KEYWORDS)} or a 0/1 string per level")


def run_specs(config: ml_collections.ConfigDict) -> list[RunSpec]:
  """Every run of an ablation config, study by study, arm by arm, seed by seed.

  Raises:
    UserError: no `ablation` section or studies, fewer than 1 seed, or an invalid arm.
  """
  if 'ablation' not in config:
    raise UserError('the config has no `ablation` section; use an experiments/configs/ablate*.py file')
  settings = config.ablation
  if settings.seeds < 1:
    raise UserError(f'ablation.seeds={settings.seeds} must be at least 1')
  if not settings.studies:
    raise UserError('ablation.studies is empty; add a study (see resunet_jax.ablation.grid.study)')
  base = config.copy_and_resolve_references()
  with base.unlocked():
    del base['ablation']
  specs = []
  for name, spec in settings.studies.items():
    depths = tuple(spec.depths) or (configs.resolve_model(base.preset, base.model).depth,)
    kinds = itertools.product(spec.get('skip_kinds', ('concat',)), spec.get('deep_supervision', (False,)))
    for depth, (kind, deep), residual, variant in itertools.product(depths, kinds, spec.residual, spec.skips):
      for suffix, skips in _skip_variants(variant, depth):
        path = variant_name(kind, bool(deep))
        arm = (
          f'{"residual" if residual else "plain"}-{suffix}'
          + (f'-{path}' if path else '')
          + (f'-d{depth}' if len(depths) > 1 else '')
        )
        fields = {'residual': bool(residual), 'skips': skips, 'depth': depth}
        if path:  # set only where they differ from the defaults: earlier grids keep their configs
          fields.update(skip_kind=kind, deep_supervision=bool(deep))
        arm_config = ablate(base, **fields)
        arm_config.data.name = spec.data
        for seed in range(settings.seeds):
          run_config = arm_config.copy_and_resolve_references()
          run_config.seed = seed
          specs.append(RunSpec(name, arm, seed, bool(residual), skips, depth, run_config, kind, bool(deep)))
  return specs


@dataclasses.dataclass(frozen=True)
class PopulationSpec:
  """Runs of a sweep trained as one population (`training.population`).

  Attributes:
    config: the population's experiment config (`population` section set).
    runs: the `RunSpec` each member stands for, in member order.
  """

  config: ml_collections.ConfigDict
  runs: tuple[RunSpec, ...]


def populations(specs: Sequence[RunSpec], *, group: bool = True) -> list[PopulationSpec]:
  """The runs of a sweep grouped into populations wherever a member trains exactly that run.

  The runs of one study, depth and skip variant form one population: their seeds are members,
  and where both the plain and the residual arm are asked for, the plain runs are members of the
  residual model with every shortcut scaled by 0 (`population.stand_in_reason` says why that is
  exact and why a zeroed skip is not, so other skip variants stay separate programs). Each
  member's result is the same as its run's alone, to float32 rounding.

  Args:
    specs: `run_specs` of an ablation config.
    group: False gives every run its own population of one (`ablation.populations=False`).
  """
  if not group:
    return [PopulationSpec(spec.config, (spec,)) for spec in specs]
  keyed: dict[tuple, list[RunSpec]] = {}
  for spec in specs:
    keyed.setdefault((spec.study, spec.depth, spec.skips, spec.variant), []).append(spec)
  grouped = []
  for runs in keyed.values():
    both = {spec.residual for spec in runs} == {False, True}
    seeds = sorted({spec.seed for spec in runs})
    base = next(spec for spec in runs if spec.residual or not both).config.copy_and_resolve_references()
    base.seed = seeds[0]
    base.population.seeds = len(seeds)
    if both:
      base.population.residual_scales = (1.0, 0.0)
    order = {(spec.seed, 1.0 if spec.residual else 0.0) if both else (spec.seed,): spec for spec in runs}
    keys = [(seed, scale) for seed in seeds for scale in (1.0, 0.0)] if both else [(seed,) for seed in seeds]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))) or sorted(order) != sorted(keys):
      grouped.extend(PopulationSpec(spec.config, (spec,)) for spec in runs)  # not a full cross: separately
      continue
    members = tuple(order[key] for key in keys)
    population_model = configs.resolve_model(base.preset, base.model)
    if any(
      population.stand_in_reason(population_model, configs.resolve_model(r.config.preset, r.config.model))
      for r in members
    ):
      grouped.extend(PopulationSpec(spec.config, (spec,)) for spec in runs)
      continue
    grouped.append(PopulationSpec(base, members))
  return grouped
