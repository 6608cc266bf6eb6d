"""The MoNuSeg skip/residual study's rules (studies/monuseg_skip_residual/study.py) on made-up rows:
the pilot's budget, the maximin rate with its tie and edge rules, failing arms, the cuts, the
order of the stages, and the runs.csv round trip."""

import dataclasses
import json
import math
import os
import pathlib
import sys

import numpy as np
import pytest

from resunet_jax.ablation import runner
from studies.monuseg_skip_residual import analysis, study
from studies.monuseg_skip_residual import run as study_run

D0 = 0.38


def _row(stage, arm, rate, steps, seed, dice, depth=4, wall=100.0):
  return study.Row(study.Run(stage, arm, rate, steps, seed, depth), dice, 0.0, 0.0, 0, wall)


def _tuning(scores, steps=400, depth=4, seeds=study.TUNING_SEEDS, stage='tuning'):
  """Rows of every (arm, rate) in `scores`, the 2-seed mean being its value (+-0.001 per seed)."""
  return [
    _row(stage, arm, rate, steps, seed, dice + (0.001 if i else -0.001), depth)
    for (arm, rate), dice in scores.items()
    for i, seed in enumerate(seeds)
  ]


def _grid(per_arm, arms=tuple(study.ARMS)):
  """scores for `arms`: per_arm[arm] is a {rate: dice}, or one {rate: dice} for every arm."""
  return {(arm, rate): d for arm in arms for rate, d in per_arm.get(arm, per_arm.get('*', {})).items()}


def _pilot(means):
  """Pilot rows: means[arm] = (Dice at 400, 800), wall time 0.1 s a step plus 30 s."""
  return [
    _row('pilot', arm, study.PILOT_RATE, n, seed, m, wall=30 + 0.1 * n)
    for arm, ms in means.items()
    for n, m in zip(study.PILOT_BUDGETS, ms, strict=True)
    for seed in study.TUNING_SEEDS
  ]


def _timing(wall=20.0):
  return [_row('timing', r.arm, r.rate, r.steps, r.seed, 0.4, r.depth, wall) for r in study.timing_runs()]


def test_budget_is_the_smallest_within_the_tolerance_of_the_largest_for_every_arm():
  close = {arm: (0.700, 0.709) for arm in study.PILOT_ARMS}
  assert study.budget(_pilot(close)) == 400
  one_slow = {**close, 'plain-none': (0.650, 0.709)}
  assert study.budget(_pilot(one_slow)) == 800
  assert study.budget(_pilot(close)[:-1]) is None  # a seed missing: no budget yet


def test_matched_rate_is_maximin_not_the_best_mean():
  # at 3e-3 one arm is bad (worst 0.50, mean high); at 1e-3 every arm is 0.70
  scores = _grid({'*': {3e-4: 0.6, 1e-3: 0.7, 3e-3: 0.9, 1e-2: 0.6}})
  scores['plain-none', 3e-3] = 0.5
  choice = study.choose(_tuning(scores), tuple(study.ARMS), 400, D0)
  assert choice.rate == 1e-3 and not choice.extend and not choice.edge


def test_ties_go_to_the_higher_mean_then_nearer_1e3_never_the_smallest_rate():
  arms = ('plain-all', 'plain-none')
  tied = _grid({'*': {3e-4: 0.6, 1e-3: 0.7, 3e-3: 0.7, 1e-2: 0.6}}, arms)
  assert study.choose(_tuning(tied), arms, 400, D0).rate == 1e-3  # equal: the rate nearer 1e-3
  higher_mean = {**tied, ('plain-all', 3e-3): 0.72}  # worst arms equal; 3e-3's mean higher
  assert study.choose(_tuning(higher_mean), arms, 400, D0).rate == 3e-3
  # 1e-3's worst arm is 0.004 better, within 0.005: 3e-3's higher mean decides, not maximin alone
  within = {**higher_mean, ('plain-all', 1e-3): 0.704, ('plain-none', 1e-3): 0.704}
  assert study.choose(_tuning(within), arms, 400, D0).rate == 3e-3
  beyond = {**within, ('plain-all', 1e-3): 0.706, ('plain-none', 1e-3): 0.706}
  assert study.choose(_tuning(beyond), arms, 400, D0).rate == 1e-3


def test_a_choice_at_the_edge_extends_the_grid_twice_then_says_edge():
  arms = ('identity-all',)
  rising = {3e-4: 0.5, 1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.8, 3e-2: 0.85, 1e-1: 0.9}
  rows = _tuning(_grid({'*': {r: rising[r] for r in study.GRID}}, arms))
  assert study.choose(rows, arms, 400, D0).extend == (3e-2,)
  rows += _tuning(_grid({'*': {3e-2: rising[3e-2]}}, arms))
  assert study.choose(rows, arms, 400, D0).extend == (1e-1,)
  rows += _tuning(_grid({'*': {1e-1: rising[1e-1]}}, arms))
  choice = study.choose(rows, arms, 400, D0)
  assert (choice.rate, choice.edge) == (1e-1, True)
  assert study.choose(rows[:-1], arms, 400, D0) is not None  # an extension lacking a seed is not used yet


def test_an_arm_failing_everywhere_extends_both_sides_once_then_is_left_out():
  arms = ('plain-none', 'identity-none')
  scores = _grid(
    {'plain-none': dict.fromkeys(study.GRID, 0.39), 'identity-none': {3e-4: 0.6, 1e-3: 0.75, 3e-3: 0.7, 1e-2: 0.6}}
  )
  rows = _tuning(scores)
  assert study.choose(rows, arms, 400, D0).extend == (1e-4, 3e-2)
  rows += _tuning({(arm, r): 0.39 if arm == 'plain-none' else 0.5 for arm in arms for r in (1e-4, 3e-2)})
  choice = study.choose(rows, arms, 400, D0)
  assert (choice.rate, choice.failing) == (1e-3, ('plain-none',))  # identity-none decides alone


def test_the_stages_come_in_order_and_a_pilot_run_at_b_is_a_tuning_run():
  assert [(s.name, len(s.runs)) for s in [study.next_stage([], D0, False)]] == [('timing', 10)]
  rows = _timing()
  assert study.next_stage(rows, D0, False).name == 'pilot'
  rows += _pilot({arm: (0.700, 0.709) for arm in study.PILOT_ARMS})
  assert study.next_stage(rows, D0, False).name == 'plan'
  tuning = study.next_stage(rows, D0, True)
  assert tuning.name == 'tuning' and len(tuning.runs) == 6 * 4 * 2 - 4 * 2  # the pilot's 1e-3 runs at B=400
  assert all(r.steps == 400 and r.split is None for r in tuning.runs)
  rows += _tuning(_grid({'*': {3e-4: 0.6, 1e-3: 0.7, 3e-3: 0.75, 1e-2: 0.65}}))
  primary = study.next_stage(rows, D0, True)
  assert primary.name == 'primary' and {(r.rate, r.split) for r in primary.runs} == {(3e-3, 'test')}
  assert len(primary.runs) == 60
  rows += [_row('primary', r.arm, r.rate, r.steps, r.seed, 0.7) for r in primary.runs]
  depth = study.next_stage(rows, D0, True)  # every own rate is the matched one: no own runs
  assert depth.name == 'depth-tuning' and {r.depth for r in depth.runs} == {2}


def test_the_plan_cuts_in_the_protocols_order_until_it_fits():
  rows = _timing() + _pilot({arm: (0.700, 0.709) for arm in study.PILOT_ARMS})
  steps, cuts, hours = study.plan(rows)  # 70 s a run at 400 steps: fits uncut
  assert (steps, cuts) == (400, 0) and sum(hours.values()) <= study.HOURS
  slow = [
    _row(r.run.stage, r.run.arm, r.run.rate, r.run.steps, r.run.seed, r.val_dice, r.run.depth, 2.5 * r.wall_s)
    for r in rows
  ]
  steps, cuts, hours = study.plan(slow)
  uncut = sum(study.project(slow, 400, 0).values())
  assert uncut > study.HOURS and cuts >= 1 and sum(hours.values()) < uncut
  assert sum(study.project(slow, 400, cuts - 1).values()) > study.HOURS  # each cut only when needed
  later = _tuning(_grid({'*': dict.fromkeys(study.GRID, 0.7)}))
  assert study.plan(slow + later) == study.plan(slow)  # the committed plan does not move as tuning rows come
  text = study_run.plan_text(slow)
  assert study.CUTS[cuts - 1] in text and study.CUTS[cuts] not in text and 'Over the limit' not in text
  slowest = [dataclasses.replace(r, wall_s=10 * r.wall_s) for r in slow]
  assert 'Over the limit after every cut' in study_run.plan_text(slowest) and study.plan(slowest)[1] == len(study.CUTS)


def test_tuning_seeds_never_see_the_test_split_and_the_trained_wide_arms_match_identity_within_2_percent():
  assert {r.split for r in study.pilot_runs() + study.timing_runs()} == {None}
  params = {r.run.arm: r.params for r in study_run.read_rows(study_run.RESULTS / 'runs.csv') if r.run.depth == 4}
  for skips in ('all', 'none'):  # the committed rows: what was trained (models.matched_width_scale)
    wide, identity, plain = (params[f'{block}-{skips}'] for block in ('wide', 'identity', 'plain'))
    assert abs(wide - identity) <= 0.02 * identity and wide > 1.1 * plain


def test_runs_csv_round_trip(tmp_path):
  line = {
    'stage': 'primary', 'arm': 'identity-none', 'depth': 4, 'rate': '0.003', 'steps': 400, 'seed': 3,
    'val_dice': '0.7', 'window_auc': '0.5', 'grad_log_ratio': '-0.2', 'params': 547761, 'wall_s': '99.0',
    'test_dice': '0.71', 'test_iou': '0.55', 'test_boundary_f1': '0.4', 'test_hd95': '20.0',
    'curve': '50:0.4 400:0.7', 'run_id': 'abc', 'cpu': 'x',
  }  # fmt: skip
  study_run.append(tmp_path / 'runs.csv', line)
  study_run.append(
    tmp_path / 'runs.csv',
    dict(line, stage='tuning', seed=1000, test_dice='', test_iou='', test_boundary_f1='', test_hd95=''),
  )
  first, second = study_run.read_rows(tmp_path / 'runs.csv')
  assert first.run == study.Run('primary', 'identity-none', 0.003, 400, 3) and math.isclose(first.test['dice'], 0.71)
  assert second.test == {} and second.params == 547761
  with pytest.raises(KeyError):
    study.Run('primary', 'no-such-arm', 1e-3, 400, 0).config()


def _simulate(test_effect, *, auc_effect=None, f1_effect=None, fail=(), wall=10.0):
  """Every run the protocol asks for, until 'done', with made-up numbers: validation Dice peaks at
  rate 3e-3, `test_effect[arm]` (+ depth 2's identity gain of 0) is added to the test Dice, a
  small per-(arm, seed) spread keeps every difference varying; (arm, seed) in `fail` fail."""
  arms = list(study.ARMS)
  rows, committed = [], False
  while (stage := study.next_stage(rows, D0, committed)).name != 'done':
    if stage.name == 'plan':
      committed = True
      continue
    for r in stage.runs:
      spread = 0.002 * ((r.seed * 7 + arms.index(r.arm) * 3) % 5)
      base = 0.7 - 0.05 * abs(math.log10(r.rate / 3e-3)) + spread
      effect = test_effect.get(r.arm, 0.0) if r.depth == 4 else 0.0
      dice = 0.39 if (r.arm, r.seed) in fail else base
      test = {'dice': dice + effect, 'boundary_f1': 0.5 + spread + (f1_effect or {}).get(r.arm, 0.0)}
      auc = 0.5 + spread + (auc_effect or {}).get(r.arm, 0.0)
      rows.append(study.Row(r, dice, auc, spread, 0, wall * (1 + r.steps / 100), test if r.split == 'test' else {}))
  return rows


def test_the_simulated_study_gives_the_verdicts_its_effects_imply():
  effects = {'identity-all': 0.05, 'identity-none': 0.05}
  rows = _simulate(effects, auc_effect=effects, f1_effect={'wide-all': 0.05}, fail={('plain-none', 3)})
  result = analysis.analyse(rows, D0)
  assert result.recipes.matched.rate == 3e-3 and result.steps == 400 and result.cuts == 0
  verdicts = {d.endpoint.name.split(':')[0]: d.verdict for d in result.primary}
  assert verdicts == {
    'E1': 'supported',
    'E2': 'supported',
    'E3': 'inconclusive',  # plain-none's failed seed: one difference of +0.31 among ten near 0
    'E4': 'supported',
    'E5': 'supported',
    'E6': 'equivalent within +-delta',
    'E7': 'not supported',
    'E8': 'supported',
  }
  assert all(d.test == 'sign_flip' and len(d.endpoint.differences) == 10 for d in result.primary)
  n, failed, interval = result.failures['primary', 'plain-none', 4]
  assert (n, failed) == (10, 1) and interval.mean == pytest.approx(
    0.7 + 0.002 * np.mean([(s * 7 + 3) % 5 for s in range(10) if s != 3])
  )
  assert result.fisher['primary', analysis.ENDPOINTS[2][0]] == pytest.approx(1.0)
  assert result.trend_p is not None
  text = analysis.render(result, rows)
  assert (
    sum(line.startswith('| E') for line in text.splitlines()) == 16
    and '1 / 10' in text
    and 'p claim (sign flip)' in text
  )
  with pytest.raises(ValueError, match='no interim analysis'):
    analysis.analyse(rows[:-1], D0)


def test_status_names_the_next_stage_without_the_data(tmp_path, commands):
  (tmp_path / 'baseline.json').write_text(json.dumps({'d0': D0}))
  script = pathlib.Path(study.__file__).with_name('run.py')
  result = commands.run(
    [sys.executable, str(script), '--status', f'--results={tmp_path}'], env={**os.environ, 'MONUSEG_DIR': ''}
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == '0 runs done; next: timing, 10 runs'
  assert 'error' not in result.stderr and not (tmp_path / 'runs.csv').exists()


def test_a_run_cut_short_counts_the_seconds_of_every_attempt(tmp_path, monkeypatch):
  attempts, clock = [], iter([0.0, 5.0, 100.0])
  result = runner.Result(
    'id', 'folder', True, '0000', 4, 1000, 400, {m: 0.5 for m in study_run.TEST_METRICS}, [(200, 0.5), (400, 0.7)],
    [{'step': 10, 'grad_norm/enc_0': 1.0, 'grad_norm/dec_0': 10.0}], {'enc_0': 1, 'dec_0': 1}, {}, 10.0,
  )  # fmt: skip

  def train(*args, **kwargs):
    attempts.append(args)
    if len(attempts) == 1:
      raise runner.Stopped('SIGTERM')
    return [result]

  monkeypatch.setattr(runner, 'run_population', train)
  monkeypatch.setattr(runner, 'run_dir', lambda config, root: tmp_path / 'run')
  monkeypatch.setattr(study_run.time, 'perf_counter', lambda: next(clock))
  run = study.Run('pilot', 'identity-none', 1e-3, 400, 1000)
  with pytest.raises(runner.Stopped):
    study_run.measure(run, tmp_path)
  line = study_run.measure(run, tmp_path)
  assert line['wall_s'] == '15.0' and line['val_dice'] == '0.700000' and line['test_dice'] == ''
  assert float(line['grad_log_ratio']) == pytest.approx(-1.0) and line['curve'] == '200:0.5000 400:0.7000'


def test_a_study_cut_to_its_primary_tier_says_e8_was_not_tested():
  rows = _simulate({'identity-none': 0.05}, wall=60.0)  # 5 min a run: every cut, and still over the hours
  result = analysis.analyse(rows, D0)
  assert result.cuts == len(study.CUTS) and result.depth_rates == {} and result.trend_p is None
  assert not any(r.run.stage.startswith('depth') for r in rows)
  assert [d.endpoint.name[:2] for d in result.primary] == [f'E{i}' for i in range(1, 8)]
  assert {len(d.endpoint.differences) for d in result.own} <= {5}  # own tier at seeds 0-4
  assert 'E8 not tested' in analysis.render(result, rows)
