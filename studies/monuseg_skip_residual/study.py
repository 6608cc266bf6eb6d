"""The MoNuSeg skip/residual study of PROTOCOL.md beside this file: its runs and its rules, as values.

Every stage is a pure function of the rows finished so far (`results/runs.csv`, one `Row` per
run): `next_stage(rows, baseline)` says which runs come next, or why nothing can run yet (a
projection to commit, the study done). `run.py` trains what it names and appends the rows, so
the study resumes from its committed CSV on any machine. The rules (the pilot's budget `B`, the
maximin learning rate, the edge extensions, the cuts) are these functions, tested on made-up
rows in tests/studies/test_monuseg_study.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

from resunet_jax import configs, models

# (arm, residual, long skips): `wide` is plain at `model.width_scale` matched to identity's count
ARMS = {
  'plain-all': (False, 'all'),
  'plain-none': (False, 'none'),
  'identity-all': (True, 'all'),
  'identity-none': (True, 'none'),
  'wide-all': (False, 'all'),
  'wide-none': (False, 'none'),
}
PILOT_ARMS = ('plain-all', 'plain-none', 'identity-all', 'identity-none')
DEPTH_ARMS = ('plain-none', 'identity-none')
DEPTHS = (2, 3)  # the depth stage's; depth 4 is the primary arms'
PILOT_BUDGETS = (400, 800)  # amendment 1: 1600 dropped
PILOT_RATE = 1e-3
GRID = (3e-4, 1e-3, 3e-3, 1e-2)
EXTENSIONS = {'low': (1e-4, 3e-5), 'high': (3e-2, 1e-1)}  # up to two a side
TUNING_SEEDS = (1000, 1001)
SEEDS = tuple(range(10))
TIMING_STEPS = 20
WINDOW = 400  # steps of the E4/E5 convergence window, the same at every budget
EVAL_EVERY = 50
BUDGET_TOLERANCE = 0.01
TIE = 0.005
FAILURE_MARGIN = 0.05  # over the best constant prediction's validation Dice
HOURS = 10.0
CUTS = (
  'depth tuning on seed 1000 only',
  'own-recipe tier at seeds 0-4',
  'depth 3 not tested',
  'B one candidate smaller',
  'the depth stage not run (E8 not tested)',  # amendment 1
)


def base_config() -> ml_collections.ConfigDict:
  """Every arm's recipe but the learning rate: MoNuSeg native, depth 4, width 8, BatchNorm,
  transposed-conv upsampling, He-normal, AdamW with 50 warmup steps, batch 4."""
  from experiments.configs import monuseg

  config = monuseg.get_config('native')
  config.model.base_width = 8
  config.model.depth = 4
  config.model.init = 'he'
  config.train.eval_every = EVAL_EVERY
  config.train.checkpoint_every = 100
  config.train.num_sample_images = 0
  return config


@functools.lru_cache
def model_config(arm: str, depth: int = 4) -> models.ModelConfig:
  """The arm's network; `wide` gets the `width_scale` matching identity's parameters with its skips."""
  residual, skips = ARMS[arm]
  base = base_config()
  fields = {'residual': residual, 'skips': skips, 'depth': depth}
  if residual:
    fields['shortcut'] = 'identity'
  model = configs.resolve_model(base.preset, {**base.model.to_dict(), **fields})
  if arm.startswith('wide'):
    target = models.param_count(model_config(arm.replace('wide', 'identity'), depth))
    model = model.replace(width_scale=models.matched_width_scale(model, target))
  return model


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: `stage` is 'timing', 'pilot', 'tuning', 'primary', 'own' or 'depth-tuning', 'depth'."""

  stage: str
  arm: str
  rate: float
  steps: int
  seed: int
  depth: int = 4

  @property
  def key(self) -> tuple:
    """What makes two runs the same training (a run reused by a later stage is not trained again)."""
    return (self.arm, self.depth, f'{self.rate:g}', self.steps, self.seed)

  @property
  def split(self) -> str | None:
    """The split of its final metrics: only seeds 0-9 ever see the test split (others: none)."""
    return 'test' if self.seed in SEEDS else None

  def config(self) -> ml_collections.ConfigDict:
    config = base_config()
    model = model_config(self.arm, self.depth)
    for name in ('residual', 'skips', 'depth', 'shortcut', 'width_scale'):
      config.model[name] = getattr(model, name)
    config.train.learning_rate = self.rate
    config.train.num_steps = self.steps
    config.seed = self.seed
    return config


@dataclasses.dataclass(frozen=True)
class Row:
  """A finished run's numbers (a line of results/runs.csv)."""

  run: Run
  val_dice: float  # final validation Dice
  window_auc: float  # validation Dice averaged over steps 0-WINDOW (trapezoid, Dice 0 at step 0)
  grad_log_ratio: float  # mean log10(per-parameter gradient RMS enc_0 / dec_0) over logged steps
  params: int
  wall_s: float  # seconds of every attempt (compilation and evaluation included)
  test: dict[str, float] = dataclasses.field(default_factory=dict)  # seeds 0-9 only


@dataclasses.dataclass(frozen=True)
class Stage:
  """What comes next: `runs` to train, or none and a `reason` (wait for a commit, or done)."""

  name: str
  runs: tuple[Run, ...] = ()
  reason: str = ''


def failed(row: Row, d0: float) -> bool:
  """The protocol's failure: final validation Dice below the best constant prediction's + 0.05."""
  return row.val_dice < d0 + FAILURE_MARGIN


def constant_dice(fractions: Iterable[float]) -> float:
  """D0: the better of all background (Dice 0) and all nucleus (mean of 2p/(1+p) over images)."""
  return max(0.0, float(np.mean([2 * p / (1 + p) for p in fractions])))


def by_seed(rows: Sequence[Row], arm: str, rate: float, steps: int, seeds, depth: int = 4) -> dict[int, Row]:
  """The arm's rows at this rate and budget among `seeds`, by seed (whichever stage trained them)."""
  return {
    r.run.seed: r
    for r in rows
    if (r.run.arm, r.run.depth, r.run.steps) == (arm, depth, steps)
    and math.isclose(r.run.rate, rate)
    and r.run.seed in seeds
  }


def mean_dice(
  rows: Sequence[Row], arm: str, rate: float, steps: int, depth: int = 4, seeds: Sequence[int] = TUNING_SEEDS
) -> float | None:
  """The mean final validation Dice of the arm's runs at `seeds`; None unless every seed has a row."""
  found = by_seed(rows, arm, rate, steps, seeds, depth)
  return float(np.mean([r.val_dice for r in found.values()])) if len(found) == len(seeds) else None


def budget(rows: Sequence[Row]) -> int | None:
  """B: the smallest pilot budget at which every pilot arm's 2-seed mean final validation Dice is
  within 0.01 of its mean at the largest budget (None until the pilot is complete)."""
  means = {(arm, n): mean_dice(rows, arm, PILOT_RATE, n) for arm in PILOT_ARMS for n in PILOT_BUDGETS}
  if any(m is None for m in means.values()):
    return None
  last = PILOT_BUDGETS[-1]
  return next(
    n for n in PILOT_BUDGETS if all(abs(means[arm, n] - means[arm, last]) <= BUDGET_TOLERANCE for arm in PILOT_ARMS)
  )


def _tie_break(scores: dict[float, float], tiebreak: dict[float, float]) -> float:
  """The rate of the best score; within TIE of it, the higher `tiebreak`, then the rate nearer 1e-3."""
  best = max(scores.values())
  tied = [rate for rate, score in scores.items() if score >= best - TIE]
  return max(tied, key=lambda rate: (round(tiebreak[rate], 12), -abs(math.log10(rate) - math.log10(PILOT_RATE))))


@dataclasses.dataclass(frozen=True)
class Choice:
  """A chosen learning rate, or the extension the rule asks for first.

  Attributes:
    rate: the chosen rate (None while `extend` is not empty).
    extend: rates to train for the arms before choosing again.
    edge: the chosen rate is still at an edge after both extensions.
    failing: arms that fail at every tried rate (left out of a maximin).
  """

  rate: float | None
  extend: tuple[float, ...] = ()
  edge: bool = False
  failing: tuple[str, ...] = ()


def _next_rate(tried: Sequence[float], side: str) -> float | None:
  for rate in EXTENSIONS[side]:
    if not any(math.isclose(rate, t) for t in tried):
      return rate
  return None


def choose(
  rows: Sequence[Row],
  arms: Sequence[str],
  steps: int,
  d0: float,
  depth: int = 4,
  seeds: Sequence[int] = TUNING_SEEDS,
) -> Choice | None:
  """The protocol's matched rate for `arms` (one arm: its own rate), from the tuning rows.

  Over the rates where every arm has all `seeds` (the grid and its extensions so far): the rate
  whose worst arm's mean final validation Dice is best (maximin), ties within 0.005 to the higher
  mean over the arms, then to the rate nearer 1e-3. An arm failing (mean below D0 + 0.05) at
  every rate gets the grid extended once on both sides, then is left out of the maximin. A
  choice at the grid's edge extends it that way, up to twice a side. None while a rate of the
  grid lacks a row.
  """
  candidates = sorted({r.run.rate for r in rows if r.run.depth == depth} | set(GRID))
  means = {rate: {arm: mean_dice(rows, arm, rate, steps, depth, seeds) for arm in arms} for rate in candidates}
  if any(m is None for rate in GRID for m in means[rate].values()):
    return None
  tried = [rate for rate in candidates if all(m is not None for m in means[rate].values())]
  failing = tuple(arm for arm in arms if all(means[rate][arm] < d0 + FAILURE_MARGIN for rate in tried))
  if failing:  # once on both sides, then the failing arms are left out
    extend = tuple(
      EXTENSIONS[side][0] for side in ('low', 'high') if not any(math.isclose(EXTENSIONS[side][0], t) for t in tried)
    )
    if extend:
      return Choice(None, extend)
  deciding = [arm for arm in arms if arm not in failing] or list(arms)
  worst = {rate: min(means[rate][arm] for arm in deciding) for rate in tried}
  average = {rate: float(np.mean([means[rate][arm] for arm in deciding])) for rate in tried}
  rate = _tie_break(worst, average)
  side = 'low' if math.isclose(rate, tried[0]) else 'high' if math.isclose(rate, tried[-1]) else None
  if side and (more := _next_rate(tried, side)) is not None:
    return Choice(None, (more,))
  return Choice(rate, edge=side is not None, failing=failing)


def seconds(rows: Sequence[Row], arm: str, steps: int, depth: int = 4) -> float:
  """Projected wall seconds of one run: from the pilot's runs of the arm (a line through its
  budgets), else the pilot's per-step line scaled by stage 0's ratio of this arm to plain's."""
  timing = {(r.run.arm, r.run.depth): r.wall_s for r in rows if r.run.stage == 'timing'}
  pilot = [r for r in rows if r.run.stage == 'pilot']
  reference = arm if any(r.run.arm == arm for r in pilot) and depth == 4 else 'plain-' + ARMS[arm][1]
  points = [(r.run.steps, r.wall_s) for r in pilot if r.run.arm == reference]
  slope, intercept = np.polyfit(*zip(*points, strict=True), 1)
  scale = timing[arm, depth] / timing[reference, 4] if reference != arm or depth != 4 else 1.0
  return float((slope * steps + intercept) * scale)


def timing_runs() -> tuple[Run, ...]:
  """Stage 0: 20 steps of every architecture (the six arms, and the depth arms at depths 2 and 3)."""
  arms = [(arm, 4) for arm in ARMS] + [(arm, depth) for depth in DEPTHS for arm in DEPTH_ARMS]
  return tuple(Run('timing', arm, PILOT_RATE, TIMING_STEPS, TUNING_SEEDS[0], depth) for arm, depth in arms)


def pilot_runs() -> tuple[Run, ...]:
  return tuple(
    Run('pilot', arm, PILOT_RATE, n, seed) for n in PILOT_BUDGETS for arm in PILOT_ARMS for seed in TUNING_SEEDS
  )


@dataclasses.dataclass(frozen=True)
class Scope:
  """What the plan keeps after its first `cuts` CUTS (`scope`); the budget cut is `plan`'s."""

  depth_tuning_seeds: tuple[int, ...]
  own_seeds: tuple[int, ...]
  depths: tuple[int, ...]


def scope(cuts: int) -> Scope:
  return Scope(
    TUNING_SEEDS[:1] if cuts >= 1 else TUNING_SEEDS,
    SEEDS[:5] if cuts >= 2 else SEEDS,
    () if cuts >= 5 else DEPTHS[:1] if cuts >= 3 else DEPTHS,
  )


def project(rows: Sequence[Row], steps: int, cuts: int = 0) -> dict[str, float]:
  """Projected hours per stage at budget `steps` with the first `cuts` cuts, the pilot as measured
  (its 1e-3 runs at `steps` are tuning runs already); the grid without extensions."""
  kept = scope(cuts)
  run = {(arm, d): seconds(rows, arm, steps, d) for arm in ARMS for d in (4, *DEPTHS) if d == 4 or arm in DEPTH_ARMS}
  hours = {
    'timing and pilot': sum(r.wall_s for r in rows if r.run.stage in ('timing', 'pilot')),
    'tuning': sum(run[r.arm, 4] for r in _missing(rows, _tune('tuning', ARMS, GRID, steps, TUNING_SEEDS))),
    'primary': len(SEEDS) * sum(run[arm, 4] for arm in ARMS),
    'own recipe (at most)': len(kept.own_seeds) * sum(run[arm, 4] for arm in ARMS),
    'depth': sum(
      (len(GRID) * len(kept.depth_tuning_seeds) + len(SEEDS)) * run[arm, d] for d in kept.depths for arm in DEPTH_ARMS
    ),
  }
  return {stage: s / 3600 for stage, s in hours.items()}


def plan(rows: Sequence[Row]) -> tuple[int, int, dict[str, float]]:
  """(B, the number of CUTS made, projected hours) of the first plan within HOURS, cutting in order.

  A function of the timing and pilot rows alone: the plan stays what was committed as later rows come.
  """
  rows = [r for r in rows if r.run.stage in ('timing', 'pilot')]
  pilot_budget = budget(rows)
  for cuts in range(len(CUTS) + 1):
    steps = pilot_budget
    if cuts >= 4:
      smaller = [n for n in PILOT_BUDGETS if n < pilot_budget]
      steps = smaller[-1] if smaller else pilot_budget
    hours = project(rows, steps, cuts)
    if sum(hours.values()) <= HOURS:
      return steps, cuts, hours
  return steps, len(CUTS), hours


def _missing(rows: Sequence[Row], runs: Iterable[Run]) -> tuple[Run, ...]:
  done = {r.run.key for r in rows}
  return tuple(dict.fromkeys(run for run in runs if run.key not in done))


def _tune(stage: str, arms: Sequence[str], rates: Iterable[float], steps: int, seeds, depth: int = 4) -> list[Run]:
  return [Run(stage, arm, rate, steps, seed, depth) for rate in rates for arm in arms for seed in seeds]


@dataclasses.dataclass(frozen=True)
class Recipes:
  """The tuning stage's outcome: `matched` (the six arms' one rate, a `Choice`) and each arm's own."""

  matched: Choice
  own: dict[str, float]


def recipes(rows: Sequence[Row], steps: int, d0: float) -> Recipes | Stage:
  """The matched and own rates at budget `steps`, or the tuning `Stage` still to train."""
  arms = tuple(ARMS)
  matched = choose(rows, arms, steps, d0)
  if matched is None or matched.rate is None:
    rates = GRID if matched is None else matched.extend
    return Stage('tuning', _missing(rows, _tune('tuning', arms, rates, steps, TUNING_SEEDS)))
  own, todo = {}, []
  for arm in arms:
    if arm in matched.failing:  # no choice among its failures: the matched rate is its own
      own[arm] = matched.rate
      continue
    choice = choose(rows, (arm,), steps, d0)
    if choice.rate is None:
      todo += _tune('tuning', (arm,), choice.extend, steps, TUNING_SEEDS)
    else:
      own[arm] = choice.rate
  if todo:
    return Stage('tuning', _missing(rows, todo))
  return Recipes(matched, own)


def next_stage(rows: Sequence[Row], d0: float, plan_committed: bool) -> Stage:
  """The runs that come next under the protocol, or (no runs) why none can: the plan to commit, done.

  Args:
    rows: every finished run (results/runs.csv).
    d0: the best constant prediction's mean validation Dice (results/baseline.json).
    plan_committed: results/plan.md, projected from the timing and pilot rows, is in git.
  """
  for stage, runs in (('timing', timing_runs()), ('pilot', pilot_runs())):
    if missing := _missing(rows, runs):
      return Stage(stage, missing)
  if not plan_committed:
    return Stage('plan', reason='commit results/plan.md (the projection from the timing and pilot rows) to go on')
  steps, cuts, _ = plan(rows)
  tuned = recipes(rows, steps, d0)
  if isinstance(tuned, Stage):
    return tuned
  rate = tuned.matched.rate
  if missing := _missing(rows, (Run('primary', arm, rate, steps, seed) for arm in ARMS for seed in SEEDS)):
    return Stage('primary', missing)
  kept = scope(cuts)
  own = (
    Run('own', arm, tuned.own[arm], steps, seed) for arm in ARMS if tuned.own[arm] != rate for seed in kept.own_seeds
  )
  if missing := _missing(rows, own):
    return Stage('own', missing)
  tune_seeds = kept.depth_tuning_seeds
  for depth in kept.depths:
    choice = choose(rows, DEPTH_ARMS, steps, d0, depth, tune_seeds)
    if choice is None or choice.rate is None:
      rates = GRID if choice is None else choice.extend
      return Stage('depth-tuning', _missing(rows, _tune('depth-tuning', DEPTH_ARMS, rates, steps, tune_seeds, depth)))
    depth_runs = (Run('depth', arm, choice.rate, steps, seed, depth) for arm in DEPTH_ARMS for seed in SEEDS)
    if missing := _missing(rows, depth_runs):
      return Stage('depth', missing)
  return Stage('done', reason='every stage is complete: results/report.md is written')
