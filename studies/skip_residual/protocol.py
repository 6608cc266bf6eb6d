"""The pre-registered skip/residual study (PROTOCOL.md beside this file) as staged, resumable runs.

Stages, each reading the results of the ones before it:

  tune       every block x skips x recipe x learning rate, one seed (`tune_seed`), the
             shortest budget; `choose` picks each (dataset, block, skips) arm's recipe and rate
             on the validation split
  initial    no training: `measures.initial` of the no-skip networks (claim 2, its validity
             check and the headline's logit spread and dead ReLUs), `initial_runs`
  pilot      the primary arms at their choice, `pilot_seeds` seeds, every budget; `plateau`
             fixes the budget B
  primary    the primary arms (`plain`, `identity`) x skips, `primary_seeds` seeds at B
  depth      the no-skip primary arms at the other depths (claim 4), width set per depth so
             that the parameter count stays near the depth-4 network's, at B
  secondary  `projection`, `plain-wide` and the primary arms under 'lecun-none', at B (after depth:
             the verdicts need only primary and depth, PROTOCOL.md's stopping rule)
  boundary   the primary all-skip arms on the three-class data (amendment 6)
  plateau_primary, plateau_depth
             where cut 4 capped B: the primary and depth stages again at the plateau rule's own
             budget (amendment 8), whose verdicts the report adds beside those at B

A run is a config (`Run.config`); its folder is the hash of that config (`runner.run_dir`), so
a run asked for by two stages (the pilot's shortest budget is the tuning run) trains once, and
a finished run is read back, never trained again. The runs of one architecture and budget that
differ in seed and learning rate train as one population (`training.population`). After the
tuning stage the projected time of the rest is checked against `budget_minutes` and the
protocol's cuts are applied in their order (`cuts`); they follow from the stored results, so a
resumed study makes the same cuts.

The study's tables (`write`: results.csv, plan.json, report.md) are rewritten after every
population into `ablation.protocol.output`; a run its results.csv lists is read back from its
row (`result_from_row`), so committed tables carry the study to a fresh clone, and SIGTERM stops
it at a population's checkpoint without measuring the run it cut short.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import jax
import ml_collections
import numpy as np

from resunet_jax import configs, models
from resunet_jax import data as data_lib
from resunet_jax.ablation import grid, runner, stats
from resunet_jax.errors import UserError
from resunet_jax.training import loop, reporting
from studies.skip_residual import analysis, figures, measures

RECIPES = {  # name -> (model.init, model.norm), in the protocol's table order
  'lecun-none': ('lecun', 'none'),
  'he-none': ('he', 'none'),
  'he-group': ('he', 'group'),
  'he-batch': ('he', 'batch'),
}
BLOCKS = {  # name -> model fields; 'plain-wide' is 'plain' at another base width
  'plain': {'residual': False},
  'projection': {'residual': True, 'shortcut': 'projection'},
  'identity': {'residual': True, 'shortcut': 'identity'},
}
PRIMARY_BLOCKS = ('plain', 'identity')
TUNED_BLOCKS = ('plain', 'projection', 'identity')
SKIPS = ('all', 'none')
STAGES = ('tune', 'pilot', 'primary', 'depth', 'secondary')  # the order they run in
# After the others, outside the projection and the cuts: amendments 6 (boundary) and 8 (plateau_*).
ADDED_STAGES = ('boundary', 'plateau_primary', 'plateau_depth')
PLATEAU_STAGES = analysis.PLATEAU_STAGES  # -> the stage they repeat
VERDICT_STAGES = ('primary', 'depth')  # the verdicts need these complete; 'secondary' carries none
CUTS = {  # name -> what it does (PROTOCOL.md, "Compute budget"), in the order they apply
  'pilot_one_seed': 'pilot: the longest budget on one seed',
  'secondary_first_dataset': "secondary: the 'lecun-none' arms on the first dataset only",
  'depth_first_dataset': 'depth: the first dataset only',
  'budget_capped': 'B capped at the middle budget',
}


def section() -> ml_collections.ConfigDict:
  """The `config.ablation.protocol` section, the protocol's settings."""
  c = ml_collections.ConfigDict()
  c.datasets = ('synthetic_roads/size32', 'synthetic_cells/size32')
  c.recipes = tuple(RECIPES)
  c.learning_rates = (3e-4, 1e-3, 3e-3, 1e-2)
  c.budgets = (300, 1000, 3000)  # steps; the first is the tuning budget
  c.tune_seed = 1000  # tuning and pilot seeds are 1000+, never used for a test-split result
  c.pilot_seeds = 2
  c.primary_seeds = 10
  c.secondary_seeds = 5
  c.depth = 4  # the primary arms' depth
  c.other_depths = (2, 3, 5)  # claim 4, no skips
  c.depth_param_tolerance = 0.15  # each depth's parameter count within 15% of the depth-4 network's
  c.failed_dice = 0.05  # final validation Dice below this: the run failed to train
  c.tie = 0.005  # validation Dice within this of the best is a tie (smaller rate, then earlier recipe)
  c.plateau_tolerance = 0.01  # B: the first budget within this of the longest's mean validation Dice
  c.budget_minutes = 150.0  # projected time of everything after tuning; cuts apply beyond it
  # The secondary stage as the whole factorial: every block x recipe x skips arm that is not a
  # primary one, at its recipe's best rate (a GPU's study; the CPU study keeps the protocol's tiers).
  c.factorial = False
  # Claim 3's boundary class (PROTOCOL.md amendment 6): (the binary dataset whose chosen recipes
  # and rates the primary all-skip arms take, its three-class twin); () for no 'boundary' stage.
  c.boundary = ()
  # PROTOCOL.md amendment 8: where cut 4 capped B below the plateau rule's budget, train the
  # primary and depth stages again at that budget, last ('plateau_primary', 'plateau_depth').
  c.plateau_stages = False
  # The folder of the study's tables (results.csv, plan.json), kept current after every
  # population; '' is the sweep folder. A run that its results.csv lists is read back from
  # its row, not trained again: committed tables carry a study over to a fresh clone.
  c.output = ''
  return c


def factorial_section(datasets: Sequence[str], boundary: tuple[str, str]) -> ml_collections.ConfigDict:
  """The protocol section of an accelerator's study: the whole factorial, 10 seeds in every tier,
  no compute cuts, on `datasets`, with claim 3's `boundary` stage."""
  c = section()
  c.datasets = tuple(datasets)
  c.boundary = tuple(boundary)
  c.primary_seeds = 10
  c.secondary_seeds = 10
  c.factorial = True
  c.budget_minutes = float('inf')
  return c


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the study."""

  data: str
  block: str  # 'plain' | 'projection' | 'identity' | 'plain-wide'
  recipe: str
  skips: str  # 'all' | 'none'
  depth: int
  width: int
  learning_rate: float
  steps: int
  seed: int

  @property
  def arm(self) -> str:
    """E.g. 'identity-none', 'plain-none-d5'."""
    return f'{self.block}-{self.skips}' + ('' if self.depth == 4 else f'-d{self.depth}')

  @property
  def architecture(self) -> tuple:
    """What one population shares: everything but the seed and the learning rate."""
    return (self.data, self.block, self.recipe, self.skips, self.depth, self.width, self.steps)

  def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's experiment config: `base` (no `ablation` section) with this run's settings."""
    init, norm = RECIPES[self.recipe]
    fields = dict(BLOCKS['plain' if self.block == 'plain-wide' else self.block])
    level = '1' if self.skips == 'all' else '0'
    fields.update(init=init, norm=norm, depth=self.depth, base_width=self.width, skips=level * self.depth)
    config = grid.ablate(base, **fields)
    config.data.name = self.data
    config.seed = self.seed
    config.train.learning_rate = self.learning_rate
    config.train.num_steps = self.steps
    config.train.checkpoint_every = max(100, self.steps // 10)
    return config


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` without its `ablation` section: what every run starts from."""
  if 'ablation' not in config or 'protocol' not in config.ablation:
    raise UserError('the config has no `ablation.protocol` section; use studies/skip_residual/configs/study.py')
  base = config.copy_and_resolve_references()
  with base.unlocked():
    del base['ablation']
  return base


@functools.cache
def _param_count(model_json: str) -> int:
  model_config = models.ModelConfig(**json.loads(model_json))
  model = models.UNet(model_config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), train=False))
  return models.count_params(shapes['params'])


_resolved: dict[tuple[str, Run], tuple[models.ModelConfig, str]] = {}


def resolve(run: Run, base: ml_collections.ConfigDict) -> tuple[models.ModelConfig, str]:
  """`run`'s model config and run id (`runner.run_dir`'s folder name), remembered per `base`:
  `loop.resolve` opens the dataset's splits each time (about 50 ms), and a study asks often."""
  key = (base.to_json_best_effort(sort_keys=True), run)
  if key not in _resolved:
    model_config, _, resolved = loop.resolve(run.config(base))
    _resolved[key] = (model_config, configs.config_hash(resolved))
  return _resolved[key]


def param_count(run: Run, base: ml_collections.ConfigDict) -> int:
  """Parameters of `run`'s network (from shapes only: nothing is initialised)."""
  model_config, _ = resolve(run, base)
  return _param_count(json.dumps(model_config.to_dict(), sort_keys=True))


def width_for(run: Run, target: int, base: ml_collections.ConfigDict, widths: Iterable[int]) -> int:
  """The width among `widths` that brings `run`'s parameter count closest to `target` (the
  nearer of the two widths around it: the count grows with the width, so a bisection finds
  them; a tie goes to the smaller)."""
  widths = sorted(widths)

  def count(index: int) -> int:
    return param_count(dataclasses.replace(run, width=widths[index]), base)

  low, high = 0, len(widths) - 1  # the first width whose count reaches the target, by bisection
  while low < high:
    middle = (low + high) // 2
    if count(middle) >= target:
      high = middle
    else:
      low = middle + 1
  candidates = [i for i in (low - 1, low) if 0 <= i < len(widths)]
  return widths[min(candidates, key=lambda i: (abs(count(i) - target), i))]


# ---- choices made from results ----


plateau = analysis.plateau  # the plateau rule, shared with the report


def final_validation(result: runner.Result) -> float:
  """The last validation Dice of a run (its final weights)."""
  return float(result.curve[-1][1]) if result.curve else float('nan')


def choose(results: dict[Run, runner.Result], settings, recipes: Sequence[str] | None = None) -> tuple[str, float]:
  """The recipe and learning rate with the highest final validation Dice among `results`.

  A tie (within `settings.tie` of the best) goes to the smaller learning rate, then to the
  recipe earlier in `settings.recipes`. `recipes` restricts the candidates.
  """
  candidates = [(run, final_validation(r)) for run, r in results.items() if recipes is None or run.recipe in recipes]
  if not candidates:
    raise ValueError('no tuning results to choose from')
  best = max(score for _, score in candidates)
  order = list(settings.recipes)
  tied = [run for run, score in candidates if score >= best - settings.tie]
  pick = min(tied, key=lambda run: (run.learning_rate, order.index(run.recipe)))
  return pick.recipe, pick.learning_rate


# ---- the stages ----


def tune_runs(settings, base) -> list[Run]:
  """Every block x skips x recipe x learning rate, at the tuning seed and the shortest budget."""
  return [
    Run(data, block, recipe, skips, settings.depth, base.model.base_width, lr, settings.budgets[0], settings.tune_seed)
    for data, block, skips, recipe, lr in itertools.product(
      settings.datasets, TUNED_BLOCKS, SKIPS, settings.recipes, settings.learning_rates
    )
  ]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The choices the tuning and pilot stages lead to (a value: a later stage replaces it)."""

  choice: dict[tuple[str, str, str], tuple[str, float]]  # (data, block, skips) -> (recipe, rate)
  lecun: dict[tuple[str, str, str], float]  # the best rate under 'lecun-none'
  cuts: tuple[str, ...]  # names in `CUTS`
  projected_minutes: float
  budget: int | None = None  # B, once the pilot is done
  rates: dict[tuple[str, str, str, str], float] = dataclasses.field(default_factory=dict)  # + recipe: its best rate


def plan_from_tuning(settings, base, tuned: dict[Run, runner.Result]) -> Plan:
  """Each arm's choice, and the cuts that bring the projected rest within the budget."""
  by_arm: dict[tuple, dict[Run, runner.Result]] = {}
  for run, result in tuned.items():
    by_arm.setdefault((run.data, run.block, run.skips), {})[run] = result
  choice = {arm: choose(results, settings) for arm, results in by_arm.items()}
  lecun = {arm: choose(results, settings, recipes=('lecun-none',))[1] for arm, results in by_arm.items()}
  member_steps = sum(run.steps for run in tuned)
  seconds_per_step = sum(r.wall_s for r in tuned.values()) / max(member_steps, 1)
  rates = {
    (*arm, recipe): choose(results, settings, recipes=(recipe,))[1]
    for arm, results in by_arm.items()
    for recipe in dict.fromkeys(run.recipe for run in results)
  }
  for count in range(len(CUTS) + 1):
    plan = Plan(choice, lecun, tuple(CUTS)[:count], 0.0, rates=rates)
    rest = [run for stage in STAGES[1:] for run in stage_runs(stage, settings, base, plan, assume_budget=True)]
    unique = {run for run in rest if run not in tuned}
    plan = dataclasses.replace(plan, projected_minutes=seconds_per_step * sum(run.steps for run in unique) / 60)
    if plan.projected_minutes <= settings.budget_minutes:
      break
  return plan


def _chosen(plan: Plan, data: str, block: str, skips: str) -> tuple[str, float]:
  return plan.choice[(data, 'plain' if block == 'plain-wide' else block, skips)]


def stage_runs(stage: str, settings, base, plan: Plan, *, assume_budget: bool = False) -> list[Run]:
  """The runs of `stage` under `plan` (the pilot's longest budget when B is not fixed yet and
  `assume_budget`: the projection's worst case, capped by the last cut)."""
  depth, width = settings.depth, base.model.base_width
  budgets = tuple(settings.budgets)
  budget = plan.budget
  if budget is None and assume_budget:
    budget = budgets[1] if 'budget_capped' in plan.cuts else budgets[-1]
  runs: list[Run] = []

  def add(data, block, skips, seeds, steps, *, recipe=None, lr=None, at_depth=depth, at_width=width):
    if recipe is None or lr is None:
      chosen_recipe, chosen_lr = _chosen(plan, data, block, skips)
      recipe, lr = recipe or chosen_recipe, lr or chosen_lr
    for seed in seeds:
      runs.append(Run(data, block, recipe, skips, at_depth, at_width, lr, steps, seed))

  if stage == 'pilot':
    seeds = range(settings.tune_seed, settings.tune_seed + settings.pilot_seeds)
    for data, block, skips in itertools.product(settings.datasets, PRIMARY_BLOCKS, SKIPS):
      for steps in budgets:
        add(data, block, skips, seeds[:1] if steps == budgets[-1] and 'pilot_one_seed' in plan.cuts else seeds, steps)
    return runs
  if budget is None:
    raise ValueError(f'the {stage} stage needs the plateau budget; run the pilot first')
  if stage == 'primary':
    for data, block, skips in itertools.product(settings.datasets, PRIMARY_BLOCKS, SKIPS):
      add(data, block, skips, range(settings.primary_seeds), budget)
  elif stage == 'secondary':
    seeds = range(settings.secondary_seeds)
    for data in settings.datasets:
      for skips in SKIPS:
        add(data, 'projection', skips, seeds, budget)
      target = param_count(Run(data, 'identity', 'he-none', 'all', depth, width, 1e-3, budget, 0), base)
      probe = Run(data, 'plain-wide', 'he-none', 'all', depth, width, 1e-3, budget, 0)
      wide = width_for(probe, target, base, range(width, 2 * width + 1))
      add(data, 'plain-wide', 'all', seeds, budget, at_width=wide)
      if settings.factorial:  # every other block x recipe x skips arm, each at its recipe's best rate
        for block, recipe, skips in itertools.product(TUNED_BLOCKS, settings.recipes, SKIPS):
          if block in PRIMARY_BLOCKS and recipe == _chosen(plan, data, block, skips)[0]:
            continue  # a primary arm, at B with the primary tier's seeds
          add(data, block, skips, seeds, budget, recipe=recipe, lr=plan.rates[(data, block, skips, recipe)])
        continue
      if 'secondary_first_dataset' in plan.cuts and data != settings.datasets[0]:
        continue
      for block, skips in itertools.product(PRIMARY_BLOCKS, SKIPS):
        add(data, block, skips, seeds, budget, recipe='lecun-none', lr=plan.lecun[(data, block, skips)])
  elif stage == 'depth':
    datasets = settings.datasets[:1] if 'depth_first_dataset' in plan.cuts else settings.datasets
    for data in datasets:
      reference = param_count(Run(data, 'plain', 'he-none', 'none', depth, width, 1e-3, budget, 0), base)
      for other in settings.other_depths:
        probe = Run(data, 'plain', 'he-none', 'none', other, width, 1e-3, budget, 0)
        at_width = width_for(probe, reference, base, range(2, 5 * width + 1))
        for block in PRIMARY_BLOCKS:  # each block against its own depth-4 network, at the same width
          own = param_count(Run(data, block, 'he-none', 'none', depth, width, 1e-3, budget, 0), base)
          at = param_count(Run(data, block, 'he-none', 'none', other, at_width, 1e-3, budget, 0), base)
          if abs(at / own - 1) > settings.depth_param_tolerance:
            raise UserError(
              f'{block} at depth {other}: width {at_width} gives {at / own:.2f}x the parameters of depth {depth}, '
              f'beyond {settings.depth_param_tolerance:.0%}; change ablation.protocol.other_depths'
            )
        for block in PRIMARY_BLOCKS:
          add(data, block, 'none', range(settings.secondary_seeds), budget, at_depth=other, at_width=at_width)
  elif stage == 'boundary':
    if settings.boundary:
      binary, three_class = settings.boundary
      for block in PRIMARY_BLOCKS:
        recipe, lr = _chosen(plan, binary, block, 'all')
        add(three_class, block, 'all', range(settings.secondary_seeds), budget, recipe=recipe, lr=lr)
  else:
    raise ValueError(f'unknown stage {stage!r}; one of {STAGES + ADDED_STAGES}')
  return runs


def initial_runs(settings, base, plan: Plan) -> list[Run]:
  """The networks whose initialisation is measured (`measures.initial`; no training):

  - every no-skip (block, recipe) arm of the tuning stage at the tuning seed (claim 2's
    validity check; the rate does not change the initial network, the smallest is taken);
  - the primary blocks without skips under 'lecun-none' (claim 2's endpoint) and under their
    chosen recipe (the headline's logit spread and dead ReLUs), the primary tier's seeds.
  """
  depth, width = settings.depth, base.model.base_width
  rate, steps = min(settings.learning_rates), settings.budgets[0]
  runs = [
    Run(data, block, recipe, 'none', depth, width, rate, steps, settings.tune_seed)
    for data, block, recipe in itertools.product(settings.datasets, TUNED_BLOCKS, settings.recipes)
  ]
  for data, block in itertools.product(settings.datasets, PRIMARY_BLOCKS):
    for recipe in dict.fromkeys(('lecun-none', _chosen(plan, data, block, 'none')[0])):
      runs += [Run(data, block, recipe, 'none', depth, width, rate, steps, s) for s in range(settings.primary_seeds)]
  return runs


def measure_initial(
  runs: Sequence[Run], base, root: pathlib.Path, *, committed: dict[str, dict] | None = None, into=None, saved=None
) -> dict[Run, runner.Result]:
  """`measures.initial` of each run's network, kept in its run folder (`initial.json`) or read
  back from a committed row; a `runner.Result` with only `extra` filled."""
  out: dict[Run, runner.Result] = {} if into is None else into
  show = jax.process_index() == 0
  bar, _ = reporting.progress_bar(show=show, total=len(runs), unit='network')
  with bar:
    for run_ in runs:
      model_config, run_id = resolve(run_, base)
      path = root / 'runs' / run_id / 'initial.json'
      row = (committed or {}).get(path.parent.name)
      if path.exists():
        values = json.loads(path.read_text())
      elif row is not None:
        values = {key: value for key, value in row.items() if key not in ROW_KEYS}
      else:
        values = measures.initial(run_.config(base))
        if show:
          path.parent.mkdir(parents=True, exist_ok=True)
          path.write_text(json.dumps(values, indent=1))
      skips = ''.join('1' if s else '0' for s in model_config.skip_levels)
      out[run_] = runner.Result(
        path.parent.name, run_.data, model_config.residual, skips, run_.depth, run_.seed, 0, {}, [], [], {}, {}, 0.0,
        values,
      )  # fmt: skip
      bar.update(1)
  if saved is not None:
    saved()
  return out


def constant_dice(run_config) -> float:
  """Final validation Dice of the constant all-background prediction on `run_config`'s data:
  the share of validation images without foreground (an empty prediction scores 1 on an empty
  mask and 0 elsewhere, `metrics`). A run failed to train when it is not `failed_dice` above
  this (PROTOCOL.md, amendment 5). Over this process's shard of the split."""
  pipeline = data_lib.make_pipeline(
    run_config.data, 'validation', batch_size=run_config.train.batch_size, seed=0, train=False
  )
  empty = []
  for batch in pipeline:
    masks = np.asarray(batch['mask']).reshape(len(batch['mask']), -1)
    empty += [not (mask > 0).any() for mask, valid in zip(masks, batch['valid'], strict=True) if valid]
  return float(np.mean(empty))


# ---- training ----


def measure(loaded, run_config, *, per_image: bool = True) -> dict:
  """The study's per-run measures (`measures.edges`, with per-image values unless not
  `per_image`, and recall by width on roads; `measures.updates` without long skips)."""
  out = measures.edges(loaded, 'test', per_image=per_image, widths='roads' in run_config.data.name)
  if '1' not in run_config.model.skips:
    out.update(measures.updates(loaded, run_config))
  return out


def measure_classes(loaded, run_config) -> dict:
  """The 'boundary' stage's measures: each class's mean test Dice (`measures.class_dice`)."""
  del run_config
  return measures.class_dice(loaded, 'test')


def train(
  runs: Sequence[Run],
  base,
  root: pathlib.Path,
  *,
  knockouts,
  measure_fn,
  label: str,
  committed: dict[str, dict] | None = None,
  into: dict[Run, runner.Result] | None = None,
  saved=None,
) -> dict[Run, runner.Result]:
  """Trains (or reads back) `runs`, those of one architecture and budget as one population.

  Args:
    knockouts: `runner.run_population`'s: False, or the study's `measures.knockouts`.
    measure_fn: `runner.run_population`'s `measure`: `measure` (without per-image lists where no
      test-split result is made), or `measure_classes`.
    committed: run_id -> a row of an earlier results.csv (`read_rows`): such a run's
      `result.json` is written from its row (`result_from_row`) instead of training it.
    into: the dict the results go into (a new one by default), filled population by population.
    saved: called before the first population trains and after each trained one (keeps the
      study's tables current, also when a study is stopped in its first population).
  """
  unique = list(dict.fromkeys(runs))
  groups: dict[tuple, list[Run]] = {}
  for run in unique:
    groups.setdefault(run.architecture, []).append(run)
  paths = {run: root / 'runs' / resolve(run, base)[1] / 'result.json' for run in unique}
  seeded: dict[Run, runner.Result] = {}  # from the committed table, on every process alike
  for run, path in paths.items():
    row = (committed or {}).get(path.parent.name)
    if row is not None and not path.exists():
      seeded[run] = result_from_row(row)
      if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        seeded[run].save(path)
  done = {run: run in seeded or path.exists() for run, path in paths.items()}
  show = jax.process_index() == 0
  if show:
    print(f'{label}: {len(unique)} runs in {len(groups)} populations, {sum(done.values())} already done')
  bar, live = reporting.progress_bar(show=show, total=len(unique), initial=sum(done.values()), unit='run')
  out: dict[Run, runner.Result] = {} if into is None else into
  for run_ in unique:
    if done[run_]:
      out[run_] = seeded[run_] if run_ in seeded else runner.Result.load(paths[run_])
  if saved is not None and not all(done.values()):
    saved()  # the tables list this stage's finished runs before the first population trains
  with bar:
    for members in groups.values():
      todo = [run_ for run_ in members if not done[run_]]
      if not todo:
        continue
      seeds = sorted({run_.seed for run_ in todo})
      rates = sorted({run_.learning_rate for run_ in todo})
      crossed = [(s, r) for s in seeds for r in rates]
      by_key = {(run_.seed, run_.learning_rate): run_ for run_ in todo}
      contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
      batches = [[by_key[key] for key in crossed]] if contiguous and sorted(by_key) == crossed else [[r] for r in todo]
      for ordered in batches:
        population_config = ordered[0].config(base)
        if len(ordered) > 1:
          population_config.population.seeds = len(seeds)
          population_config.population.learning_rates = tuple(rates)
        first = ordered[0]
        bar.set_postfix_str(f'{first.data.split("/")[0]} {first.arm} {first.recipe} {first.steps} steps')
        results = runner.run_population(
          population_config,
          [r.config(base) for r in ordered],
          root,
          knockouts=knockouts,
          measure=measure_fn,
        )
        out.update(zip(ordered, results, strict=True))
        if saved is not None:
          saved()
        bar.update(len(ordered))
        if show and not live:
          reporting.progress_line(f'{label}: {first.data} {first.arm} {first.recipe} {first.steps} steps done')
  for run_ in (run_ for members in groups.values() for run_ in members):
    out[run_] = out.pop(run_)  # population order, however many were read back: a resumed table is the same
  return out


def output_dir(config, root: str | pathlib.Path) -> pathlib.Path:
  """Where the study's tables go: `ablation.protocol.output`, or the sweep folder `root`."""
  return pathlib.Path(config.ablation.protocol.output or root)


def run(
  config, root: str | pathlib.Path, *, command: str = ''
) -> tuple[dict[str, dict[Run, runner.Result]], Plan | None]:
  """Runs (or reads back) every stage of the study, in order, keeping its tables current.

  The finished runs listed in the output folder's results.csv are read back from their rows;
  the tables (`write`) are rewritten after every trained population, so a study stopped at any
  point keeps every finished run.

  Returns:
    stage -> {run: result}, and the plan the stages followed.
  """
  root = pathlib.Path(root)
  settings = config.ablation.protocol
  base = base_config(config)
  root.mkdir(parents=True, exist_ok=True)
  output = output_dir(config, root)
  table = read_rows(output / 'results.csv')
  committed = {row['run_id']: row for row in table if row['stage'] in STAGES + ADDED_STAGES}
  initial = {row['run_id']: row for row in table if row['stage'] == 'initial'}
  if config.ablation.compilation_cache:
    runner.use_compilation_cache(root / 'compilation_cache')
  stages: dict[str, dict[Run, runner.Result]] = {}
  planned: dict[str, int] = {}
  plan: Plan | None = None

  baselines = {
    name: constant_dice(Run(name, 'plain', 'he-none', 'all', settings.depth, 8, 1e-3, 1, 0).config(base))
    for name in settings.datasets
  }

  def save(draw: bool = False) -> None:  # verdicts once the primary and depth stages are complete (the stopping rule)
    final = all(len(stages.get(name, {})) == planned.get(name, -1) for name in VERDICT_STAGES)
    write(
      stages, plan, config, output, command=command, planned=planned, final=final, baselines=baselines, keep=table,
      draw=draw,
    )  # fmt: skip

  def stage(name: str, runs: Sequence[Run], *, knockouts, measure_fn) -> dict[Run, runner.Result]:
    stages[name], planned[name] = {}, len(set(runs))
    out = train(
      runs, base, root, knockouts=knockouts, measure_fn=measure_fn, label=name, committed=committed,
      into=stages[name], saved=save,
    )  # fmt: skip
    save(draw=True)  # also when every run was read back: the report follows the code that reads the table
    return out

  with runner.sigterm_stops():  # SIGTERM: the study stops after (or inside) the current population
    no_test_use = functools.partial(measure, per_image=False)  # tune, pilot: no test-split result
    stage('tune', tune_runs(settings, base), knockouts=False, measure_fn=no_test_use)
    plan = plan_from_tuning(settings, base, stages['tune'])
    if jax.process_index() == 0:
      cuts = '; '.join(CUTS[c] for c in plan.cuts) or 'none'
      minutes = f'{plan.projected_minutes:.0f} min (budget {settings.budget_minutes:g})'
      print(f'projected rest of the study: {minutes}; cuts: {cuts}')
    networks = initial_runs(settings, base, plan)
    stages['initial'], planned['initial'] = {}, len(set(networks))
    measure_initial(networks, base, root, committed=initial, into=stages['initial'], saved=save)
    stage('pilot', stage_runs('pilot', settings, base, plan), knockouts=False, measure_fn=no_test_use)
    arms: dict[tuple, dict[int, list[float]]] = {}
    for run_, result in stages['pilot'].items():
      arms.setdefault((run_.data, run_.block, run_.skips), {}).setdefault(run_.steps, []).append(
        final_validation(result)
      )
    budgets = tuple(settings.budgets)
    uncapped = plateau(arms, budgets, settings.plateau_tolerance)
    plan = dataclasses.replace(plan, budget=min(uncapped, budgets[1]) if 'budget_capped' in plan.cuts else uncapped)
    if jax.process_index() == 0:
      print(f'plateau budget B = {plan.budget} steps')
    for name in STAGES[2:]:
      stage(name, stage_runs(name, settings, base, plan), knockouts=measures.knockouts, measure_fn=measure)
    if settings.boundary:  # claim 3's boundary class: test metrics per class, no knock-outs
      stage('boundary', stage_runs('boundary', settings, base, plan), knockouts=False, measure_fn=measure_classes)
    if settings.get('plateau_stages') and uncapped > plan.budget:  # amendment 8: the verdict stages at the plateau
      at_plateau = dataclasses.replace(plan, budget=uncapped)
      for name, repeated in PLATEAU_STAGES.items():
        stage(name, stage_runs(repeated, settings, base, at_plateau), knockouts=False, measure_fn=measure)
    save()
  return stages, plan


def auc(result: runner.Result) -> float:
  """Claim 1's measure: the area under the validation-Dice curve over the run's budget."""
  return stats.area_under_curve(result.curve, result.num_steps)


ROW_KEYS = (
  'stage',
  'data',
  'arm',
  'block',
  'recipe',
  'skips',
  'depth',
  'width',
  'params',
  'learning_rate',
  'steps',
  'seed',
  'run_id',
  'constant_val_dice',
  'failed',
  'val_dice',
  'val_auc',
)
# Columns holding JSON (the rest of a `runner.Result`, so that a row is the whole finished run)
JSON_KEYS = ('val_curve', 'param_counts', 'knockouts', *(f'{name}_per_image' for name in measures.PER_IMAGE))
_TEXT_KEYS = ('stage', 'data', 'arm', 'block', 'recipe', 'skips', 'run_id')
_INT_KEYS = ('depth', 'width', 'params', 'steps', 'seed', 'failed')


def rows(
  stages: dict[str, dict[Run, runner.Result]], settings, baselines: dict[str, float] | None = None
) -> list[dict]:
  """One row per stage and run: its settings, validation figures, test metrics and measures
  (stage 'initial': its settings and `measures.initial` only). `failed`: the final validation
  Dice is not `settings.failed_dice` above `constant_val_dice`, that of the constant
  all-background prediction on the run's data (`baselines`, from `constant_dice`; 0 without).

  `test_*` are the means over test images (`evaluation.METRICS`; `test_boundary_f1` at the
  config's tolerance); the `Result.extra` measures follow under their own names, then
  `wall_s` and the `JSON_KEYS` columns (`result_from_row` rebuilds the run's `Result`; only
  the logged training gradients are not kept).
  """
  out = []
  for stage, results in stages.items():
    for run_, result in results.items():
      row = {
        'stage': stage,
        'data': run_.data,
        'arm': run_.arm,
        'block': run_.block,
        'recipe': run_.recipe,
        'skips': run_.skips,
        'depth': run_.depth,
        'width': run_.width,
        'learning_rate': run_.learning_rate,
        'steps': run_.steps,
        'seed': run_.seed,
        'run_id': result.run_id,
      }
      if stage == 'initial':  # a network at initialisation: its measures only
        out.append(row | result.extra)
        continue
      row['params'] = sum(result.param_counts.values())  # the arm's (`param_count`), counted by the run
      row['constant_val_dice'] = (baselines or {}).get(run_.data, 0.0)
      row['failed'] = int(final_validation(result) < row['constant_val_dice'] + settings.failed_dice)
      row['val_dice'] = final_validation(result)
      row['val_auc'] = auc(result)
      row.update({f'test_{name}': value for name, value in result.test.items()})
      row.update({key: json.dumps(v) if isinstance(v, list) else v for key, v in result.extra.items()})
      row['wall_s'] = result.wall_s
      row['val_curve'] = json.dumps([[int(step), float(dice)] for step, dice in result.curve])
      row['param_counts'] = json.dumps(result.param_counts, sort_keys=True)
      row['knockouts'] = json.dumps(result.knockouts, sort_keys=True)
      out.append(row)
  return out


def read_rows(path: str | pathlib.Path) -> list[dict]:
  """The rows of a study's results.csv with their types back (numbers, JSON columns parsed);
  an empty cell is absent from its row. No file: no rows."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  out = []
  with path.open(newline='') as f:
    for line, raw in enumerate(csv.DictReader(f), start=2):
      row: dict = {}
      try:
        for key, value in raw.items():
          if value is None or value == '':
            continue
          if key in _TEXT_KEYS:
            row[key] = value
          elif key in JSON_KEYS:
            row[key] = json.loads(value)
          elif key in _INT_KEYS:
            row[key] = int(value)
          else:
            row[key] = float(value)
      except (ValueError, TypeError) as e:
        raise UserError(f'{path}, line {line}: unreadable cell ({e}); restore the file from git') from e
      needed = ('stage', 'run_id') if row.get('stage') == 'initial' else ('stage', 'run_id', 'val_curve')
      missing = [key for key in needed if key not in row]
      if missing:
        raise UserError(f'{path}, line {line}: no {", ".join(missing)}; restore the file from git')
      out.append(row)
  return out


def result_from_row(row: dict) -> runner.Result:
  """The `runner.Result` of a finished run from its results.csv row (`read_rows`); its logged
  training gradients are not in the table and come back empty."""
  known = set(ROW_KEYS) | {'val_curve', 'param_counts', 'knockouts', 'wall_s'}
  depth = row['depth']
  return runner.Result(
    run_id=row['run_id'],
    data=row['data'],
    residual=row['block'] in ('projection', 'identity'),
    skips=('1' if row['skips'] == 'all' else '0') * depth,
    depth=depth,
    seed=row['seed'],
    num_steps=row['steps'],
    test={key[len('test_') :]: value for key, value in row.items() if key.startswith('test_')},
    curve=[(int(step), float(dice)) for step, dice in row['val_curve']],
    gradients=[],
    param_counts=row.get('param_counts', {}),
    knockouts=row.get('knockouts', {}),
    wall_s=row.get('wall_s', 0.0),
    extra={key: value for key, value in row.items() if key not in known and not key.startswith('test_')},
  )


def table_paths(output: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """The study's tables in its output folder (`write`)."""
  output = pathlib.Path(output)
  return {'results': output / 'results.csv', 'plan': output / 'plan.json', 'report': output / 'report.md'}


def write(
  stages,
  plan: Plan | None,
  config,
  output: str | pathlib.Path,
  *,
  command: str,
  planned: dict[str, int] | None = None,
  final: bool = False,
  baselines: dict[str, float] | None = None,
  keep: Sequence[dict] = (),
  draw: bool = True,
) -> dict[str, pathlib.Path]:
  """Writes the study's `results.csv` (every stage's rows so far), `plan.json` (once the
  tuning stage has made the plan) and `report.md` (`analysis.markdown`: verdicts, secondary
  analyses and the figures of `figures.study_figures` only when `final`) into the folder
  `output`, each table replaced atomically.

  Args:
    planned: stage -> its number of runs, for the stages started so far.
    baselines: dataset -> `constant_dice` (see `rows`).
    keep: rows of the table read at the start (`read_rows`); those of a (stage, run) not in
      `stages` yet stay in the table, so that a study stopped before it reaches a stage again
      never drops that stage's committed rows.
    draw: draw the figures (when `final`); else the report links those already drawn. The study
      draws them at the end of each stage: they show the tuning, verdict and plateau stages,
      which change only there, and drawing them after every population was most of a write.
  """
  output = pathlib.Path(output)
  settings = config.ablation.protocol
  table = rows(stages, settings, baselines)
  present = {(row['stage'], row['run_id']) for row in table}
  table += [
    {key: json.dumps(value) if key in JSON_KEYS else value for key, value in row.items()}
    for row in keep
    if (row['stage'], row['run_id']) not in present
  ]
  paths = table_paths(output)
  if jax.process_index() != 0:
    return paths
  output.mkdir(parents=True, exist_ok=True)
  names = [key for key in dict.fromkeys(key for row in table for key in row) if key not in JSON_KEYS]

  def replace(path: pathlib.Path, text: str) -> None:
    temporary = path.with_suffix(f'.tmp{os.getpid()}')
    temporary.write_text(text)
    os.replace(temporary, path)

  buffer = io.StringIO(newline='')
  writer = csv.DictWriter(buffer, fieldnames=[*names, *JSON_KEYS])
  writer.writeheader()
  writer.writerows(table)
  replace(paths['results'], buffer.getvalue())
  summary = {}
  if plan is not None:
    choice = {'/'.join(key): {'recipe': r, 'learning_rate': lr} for key, (r, lr) in plan.choice.items()}
    summary = {
      'command': command,
      'choice': choice,
      'cuts': [CUTS[c] for c in plan.cuts],
      'projected_minutes': plan.projected_minutes,
      'budget': plan.budget,
    }
    replace(paths['plan'], json.dumps(summary, indent=1) + '\n')
  progress = {
    stage: (len(stages.get(stage, {})), (planned or {}).get(stage))
    for stage in ('tune', 'initial', *STAGES[1:], *(s for s in ADDED_STAGES if s in stages))
  }
  rows_back = read_rows(paths['results'])  # the report is what a reader recomputes from the table
  plateau = analysis.plateau_complete(progress)
  if not final:
    drawn = []
  elif draw:
    drawn = figures.study_figures(rows_back, output, plateau=plateau)
  else:
    drawn = [name for name in figures.study_figure_names(plateau) if (output / name).exists()]
  text = analysis.markdown(
    rows_back, progress=progress, plan=summary or {'command': command}, final=final, figures=drawn
  )
  replace(paths['report'], text + '\n')
  paths.update({name.removesuffix('.png'): output / name for name in drawn})
  return paths
