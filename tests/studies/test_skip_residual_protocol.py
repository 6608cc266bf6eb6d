"""The staged skip/residual study (studies/skip_residual/protocol.py): choices, stages, cuts, configs, measures."""

import dataclasses
import json
import os
import pathlib
import runpy
import shlex
import sys

import jax
import numpy as np
import pytest

from resunet_jax import configs
from resunet_jax.ablation import runner
from studies.skip_residual import analysis, figures, measures, protocol

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _study_config():
  return runpy.run_path(str(ROOT / 'studies/skip_residual/configs/study.py'))['get_config']()


def _result(final_dice: float, wall_s: float = 0.0, steps: int = 300) -> runner.Result:
  return runner.Result(
    'id',
    'data',
    False,
    '1111',
    4,
    0,
    steps,
    {},
    [(steps // 2, final_dice / 2), (steps, final_dice)],
    [],
    {},
    {},
    wall_s,
  )


def _tuned(settings, base, score):
  """Tuning results: `score(run)` is each run's final validation Dice."""
  return {run: _result(score(run), wall_s=30.0) for run in protocol.tune_runs(settings, base)}


def test_choose_takes_the_best_validation_dice_and_breaks_ties_by_rate_then_recipe():
  settings = protocol.section()
  run = protocol.Run('d', 'plain', 'he-none', 'all', 4, 8, 1e-3, 300, 1000)

  def at(recipe, lr):
    return dataclasses.replace(run, recipe=recipe, learning_rate=lr)

  results = {at('he-none', 1e-3): _result(0.70), at('he-group', 3e-3): _result(0.80)}
  assert protocol.choose(results, settings) == ('he-group', 3e-3)
  results[at('he-batch', 1e-3)] = _result(0.797)  # a tie: the smaller rate wins
  assert protocol.choose(results, settings) == ('he-batch', 1e-3)
  results[at('lecun-none', 1e-3)] = _result(0.796)  # same rate: the earlier recipe wins
  assert protocol.choose(results, settings) == ('lecun-none', 1e-3)
  results[at('lecun-none', 3e-4)] = _result(0.5)  # outside the tie: not chosen for its rate
  assert protocol.choose(results, settings) == ('lecun-none', 1e-3)
  assert protocol.choose(results, settings, recipes=('he-none',)) == ('he-none', 1e-3)


def test_plateau_is_the_first_budget_every_arm_is_within_tolerance_of_its_longest():
  curves = {
    'a': {300: [0.70, 0.72], 1000: [0.80, 0.80], 3000: [0.805, 0.81]},
    'b': {300: [0.5], 1000: [0.6], 3000: [0.6]},
  }
  assert protocol.plateau(curves, (300, 1000, 3000), 0.01) == 1000
  curves['b'][1000] = [0.58]
  assert protocol.plateau(curves, (300, 1000, 3000), 0.01) == 3000
  assert protocol.plateau(curves, (300, 1000, 3000), 0.5) == 300


def test_run_config_sets_the_arm_and_every_run_has_its_own_folder(tfds_dir):
  config = _study_config()
  config.data.data_dir = tfds_dir
  base = protocol.base_config(config)
  run = protocol.Run('synthetic_cells/size32', 'identity', 'he-group', 'none', 4, 8, 3e-3, 1000, 7)
  run_config = run.config(base)
  model = configs.resolve_model(run_config.preset, run_config.model)
  assert (model.residual, model.shortcut, model.init, model.norm, model.skips) == (
    True,
    'identity',
    'he',
    'group',
    '0000',
  )
  assert (run_config.seed, run_config.train.learning_rate, run_config.train.num_steps) == (7, 3e-3, 1000)
  assert run_config.data.name == 'synthetic_cells/size32' and run_config.data.image_size == 32
  wide = protocol.Run('synthetic_roads/small', 'plain-wide', 'lecun-none', 'all', 4, 11, 1e-3, 300, 0).config(base)
  assert (wide.model.residual, wide.model.base_width, wide.model.skips) == (False, 11, '1111')
  folders = {
    runner.run_dir(protocol.Run('synthetic_roads/small', 'plain', 'he-none', 'all', 4, 8, lr, 300, 0).config(base), 'r')
    for lr in (1e-3, 3e-3)
  }
  assert len(folders) == 2


def test_stages_follow_the_plan_and_the_cuts_apply_in_order(tfds_dir):
  config = _study_config()
  config.data.data_dir = tfds_dir
  settings = config.ablation.protocol
  settings.datasets = ('synthetic_roads/small', 'synthetic_cells/small')  # built already; counts do not depend on size
  base = protocol.base_config(config)
  tuned = _tuned(settings, base, lambda run: 0.5 + run.learning_rate)  # the largest rate wins everywhere
  assert len(tuned) == 2 * 3 * 2 * 4 * 4  # datasets x blocks x skips x recipes x rates, 1 seed
  plan = protocol.plan_from_tuning(settings, base, tuned)
  assert set(plan.choice.values()) == {('lecun-none', 1e-2)}
  # 30 s per 300-step run is 0.1 s per member-step: the rest needs far more than 150 minutes
  assert plan.cuts == tuple(protocol.CUTS) and plan.projected_minutes > settings.budget_minutes
  pilot = protocol.stage_runs('pilot', settings, base, plan)
  longest = [run for run in pilot if run.steps == 3000]
  assert len(pilot) == 2 * 4 * (2 + 2 + 1) and {run.seed for run in longest} == {1000}
  assert {run.seed for run in pilot} == {1000, 1001} and all(run.block in protocol.PRIMARY_BLOCKS for run in pilot)
  with pytest.raises(ValueError, match='plateau budget'):
    protocol.stage_runs('primary', settings, base, plan)
  plan = dataclasses.replace(plan, budget=1000)
  primary = protocol.stage_runs('primary', settings, base, plan)
  assert len(primary) == 2 * 4 * 10 and {run.steps for run in primary} == {1000}
  assert {run.seed for run in primary} == set(range(10))
  secondary = protocol.stage_runs('secondary', settings, base, plan)
  lecun = [run for run in secondary if run.block in protocol.PRIMARY_BLOCKS]
  assert {run.data for run in lecun} == {settings.datasets[0]}  # secondary_first_dataset
  wide = {run.width for run in secondary if run.block == 'plain-wide'}
  (width,) = wide
  identity = protocol.param_count(
    protocol.Run(settings.datasets[0], 'identity', 'he-none', 'all', 4, 8, 1e-3, 1000, 0), base
  )

  def gap(w):
    run = protocol.Run(settings.datasets[0], 'plain-wide', 'he-none', 'all', 4, w, 1e-3, 1000, 0)
    return abs(protocol.param_count(run, base) - identity)

  # the closest integer width; at base 8 that is 8 itself (491,137 and 621,460 at 9 against 519,089)
  assert all(gap(width) <= gap(w) for w in range(8, 17))
  depth = protocol.stage_runs('depth', settings, base, plan)
  assert {run.data for run in depth} == {settings.datasets[0]}  # depth_first_dataset
  for run in depth:  # each block within tolerance of its own depth-4 network
    assert run.skips == 'none' and run.depth in (2, 3, 5)
    own = protocol.param_count(dataclasses.replace(run, depth=4, width=8), base)
    assert abs(protocol.param_count(run, base) / own - 1) < settings.depth_param_tolerance
  settings.budget_minutes = 1e9
  assert protocol.plan_from_tuning(settings, base, tuned).cuts == ()
  settings.factorial = True  # a GPU's secondary stage: the 20 other arms of each dataset, each at its recipe's rate
  # he-group does best at the smallest rate, every other recipe at the largest
  plan = protocol.plan_from_tuning(
    settings,
    base,
    _tuned(settings, base, lambda run: 0.5 + run.learning_rate * (-1 if run.recipe == 'he-group' else 1)),
  )
  plan = dataclasses.replace(plan, budget=1000)
  factorial = protocol.stage_runs('secondary', settings, base, plan)
  arms = {(run.data, run.block, run.recipe, run.skips) for run in factorial if run.block != 'plain-wide'}
  assert len(arms) == 2 * (3 * 4 * 2 - 4) and {run.seed for run in factorial} == set(range(5))
  for run in factorial:
    assert run.learning_rate == (3e-4 if run.recipe == 'he-group' else 1e-2), run
  assert not arms & {(run.data, run.block, run.recipe, run.skips) for run in primary}


def test_image_scores_on_hand_made_masks():
  truth = np.zeros((16, 16), bool)
  truth[4:12, 4:12] = True
  perfect = measures.image_scores(truth, truth)
  assert perfect['dice'] == 1.0 and perfect['hd95'] == 0.0 and perfect['empty'] == 0.0
  assert all(perfect[f'boundary_f1_{t}px'] == 1.0 for t in measures.TOLERANCES)
  assert perfect['band_error'] == 0.0 and perfect['interior_error'] == 0.0
  shifted = np.roll(truth, 1, axis=1)
  scores = measures.image_scores(shifted, truth)
  assert scores['boundary_f1_0px'] < 1.0 and scores['boundary_f1_1px'] == 1.0
  assert scores['band_error'] > 0 and scores['interior_error'] == 0.0  # every wrong pixel is on an edge
  empty = measures.image_scores(np.zeros_like(truth), truth)
  assert empty['empty'] == 1.0 and np.isnan(empty['hd95']) and empty['dice'] == 0.0


def test_dead_fraction_counts_channels_zero_everywhere():
  alive = np.ones((2, 4, 4, 3))
  dead = np.zeros((2, 4, 4, 3))
  dead[..., 0] = 1.0  # one of three channels fires somewhere
  intermediates = {
    'enc_0': {'conv2': {'__call__': (alive,)}},
    'dec_0': {'conv2': {'__call__': (dead,)}},
    '__call__': (),
  }
  assert measures._dead_fraction(intermediates, 'none') == pytest.approx(2 / 6)


def test_initial_gradients_are_those_of_the_runs_first_step(tfds_dir):
  from resunet_jax import losses
  from resunet_jax.training import loop, steps

  config = runpy.run_path(str(ROOT / 'experiments/configs/quick.py'))['get_config']()
  config.data.data_dir = tfds_dir
  out = measures.initial(config)
  model_config, info, _ = loop.resolve(config)
  state = measures._init_state(config, model_config, info)
  weights = losses.LossWeights.from_config(config.train)
  step = jax.jit(lambda state, batch: steps.train_step(state, batch, loss_weights=weights))
  _, step_metrics = step(state, measures._first_batch(config))
  for name in ('enc_0', 'dec_0', 'bottleneck'):
    count = sum(int(leaf.size) for leaf in jax.tree.leaves(state.params[name]))
    assert out[f'grad_rms/{name}'] == pytest.approx(float(step_metrics[f'grad_norm/{name}']) / np.sqrt(count), rel=1e-5)
  assert out['log10_grad_ratio'] == pytest.approx(np.log10(out['grad_rms/enc_0'] / out['grad_rms/dec_0']))
  assert out['logit_std'] > 0 and 0 <= out['dead_relu'] <= 1


def _quick_study(tfds_dir, output):
  config = runpy.run_path(str(ROOT / 'studies/skip_residual/configs/quick.py'))['get_config']()
  config.data.data_dir = tfds_dir
  config.ablation.compilation_cache = False
  config.ablation.protocol.output = str(output)
  return config


def test_a_results_row_gives_back_the_whole_result(tmp_path):
  config = _study_config()
  run = protocol.Run('synthetic_cells/size32', 'identity', 'he-group', 'none', 4, 8, 3e-3, 1000, 7)
  result = runner.Result(
    'abc123',
    'synthetic_cells/size32',
    True,
    '0000',
    4,
    7,
    1000,
    {'dice': 0.8125, 'hd95': float('nan')},
    [(50, 0.1), (1000, 1 / 3)],
    [],
    {'enc_0': 10, 'dec_0': 5},
    {'residual': {'labels': ['none', 'all'], 'scales': [[1.0], [0.0]], 'dice': [0.8, 0.1]}},
    12.5,
    {'update/enc_0': 0.25, 'boundary_f1_1px': 0.6, 'dice_per_image': [0.5, 0.125, 1 / 3]},
  )
  paths = protocol.write({'primary': {run: result}}, None, config, tmp_path, command='x')
  assert not paths['plan'].exists()  # no plan before the tuning stage has made one
  (row,) = protocol.read_rows(paths['results'])
  assert (row['stage'], row['arm'], row['params'], row['failed']) == ('primary', 'identity-none', 15, 0)
  back = protocol.result_from_row(row)
  assert np.isnan(back.test.pop('hd95')) and np.isnan(result.test.pop('hd95'))
  assert back == result  # exactly: floats round-trip through the CSV
  later = dict(row, stage='depth', run_id='def456')  # a committed row of a stage this process has not reached
  protocol.write({'primary': {run: result}}, None, config, tmp_path, command='x', keep=[row, later])
  assert [(r['stage'], r['run_id']) for r in protocol.read_rows(paths['results'])] == [
    ('primary', 'abc123'),
    ('depth', 'def456'),
  ]  # kept once each, the JSON columns intact
  assert protocol.read_rows(paths['results'])[1]['dice_per_image'] == row['dice_per_image']
  (tmp_path / 'results.csv').write_text('stage,run_id\ntune,x\n')
  with pytest.raises(protocol.UserError, match='line 2: no val_curve'):
    protocol.read_rows(tmp_path / 'results.csv')


def _fake_population(calls, fail_after=None, fail_if=lambda run_config: False, residual_gain=0.0):
  """`runner.run_population` without training: Dice from the recipe and rate (and `residual_gain`
  per step for residual networks), result.json as the real one. It raises after `fail_after`
  populations, or at a population with a run that `fail_if`."""

  def run_population(config, runs, root, *, knockouts, measure):
    if (fail_after is not None and len(calls) >= fail_after) or any(fail_if(run) for run in runs):
      raise RuntimeError('killed')
    calls.append(len(runs))
    out = []
    for run_config in runs:
      path = runner.run_dir(run_config, root) / 'result.json'
      lr, steps = float(run_config.train.learning_rate), int(run_config.train.num_steps)
      dice = 0.5 + lr + 0.01 * (run_config.model.norm == 'group') + steps / 100 + 1e-3 * run_config.seed
      dice += residual_gain * steps * bool(run_config.model.residual) * (1 + 0.1 * run_config.seed)
      result = runner.Result(
        path.parent.name, run_config.data.name, bool(run_config.model.residual), run_config.model.skips,
        int(run_config.model.depth), int(run_config.seed),
        steps, {'dice': dice - 0.01}, [(steps // 2, dice / 2), (steps, dice)], [], {'enc_0': 3}, {}, 1.0,
        {'update/enc_0': lr},
      )  # fmt: skip
      path.parent.mkdir(parents=True, exist_ok=True)
      result.save(path)
      out.append(result)
    return out

  return run_population


def test_a_study_keeps_its_table_current_and_resumes_from_it_in_an_empty_workdir(
  tfds_dir, tmp_path, monkeypatch, commands
):
  output = tmp_path / 'committed'
  config = _quick_study(tfds_dir, output)
  args = [
    '--config=studies/skip_residual/configs/quick.py',
    f'--config.data.data_dir={tfds_dir}',
    '--config.ablation.compilation_cache=False',
    f'--config.ablation.protocol.output={output}',
    f'--workdir={tmp_path / "fourth"}',
  ]
  env = {**os.environ, 'XLA_FLAGS': ''}
  command = shlex.join(['python', 'studies/skip_residual/run.py', *args])  # the report's, in every run alike
  calls, initialised = [], []

  def initial(run_config):
    initialised.append(int(run_config.seed))
    return {'log10_grad_ratio': -0.5 * run_config.model.residual + 1e-3 * run_config.seed}

  monkeypatch.setattr(measures, 'initial', initial)
  monkeypatch.setattr(runner, 'run_population', _fake_population(calls, fail_after=5))
  with pytest.raises(RuntimeError, match='killed'):
    protocol.run(config, tmp_path / 'first', command=command)
  assert len(protocol.read_rows(output / 'results.csv')) == sum(calls) > 0  # every finished population is kept
  assert 'None yet' in (output / 'report.md').read_text()  # no interim verdicts
  (output / 'report.md').unlink()  # resumed, then stopped in its first population: the stage's finished runs are listed
  monkeypatch.setattr(runner, 'run_population', _fake_population(calls, fail_after=len(calls)))
  with pytest.raises(RuntimeError, match='killed'):
    protocol.run(config, tmp_path / 'first', command=command)
  assert f'| tune | {sum(calls)} | ' in (output / 'report.md').read_text()

  def secondary(run_config):  # projection runs at B (6 steps) belong to the secondary stage only
    return run_config.model.shortcut == 'projection' and int(run_config.train.num_steps) == 6

  monkeypatch.setattr(runner, 'run_population', _fake_population(calls, fail_if=secondary))
  with pytest.raises(RuntimeError, match='killed'):
    protocol.run(config, tmp_path / 'first', command=command)
  rows = protocol.read_rows(output / 'results.csv')
  assert any(row['stage'] == 'depth' for row in rows)  # stopped at the secondary stage's first projection population
  assert not any(row['stage'] == 'secondary' and row['block'] == 'projection' for row in rows)
  report = (output / 'report.md').read_text()  # primary and depth complete: the verdicts, before the secondary stage
  assert 'None yet' not in report and '## Secondary analyses' in report and (output / 'depth_gain.png').exists()
  (output / 'report.md').unlink()  # stopped again before any new run finishes: the report is still rewritten
  with pytest.raises(RuntimeError, match='killed'):
    protocol.run(config, tmp_path / 'first', command=command)
  assert (output / 'report.md').read_text() == report
  monkeypatch.setattr(runner, 'run_population', _fake_population(calls))
  stages, plan = protocol.run(config, tmp_path / 'second', command=command)  # an empty workdir: the table seeds it
  trained = sum(calls)
  table = (output / 'results.csv').read_text()
  trained_ids = {row['run_id'] for row in protocol.read_rows(output / 'results.csv') if row['stage'] != 'initial'}
  assert trained == len(trained_ids)  # each run trained once
  assert (
    set(stages) == {*protocol.STAGES, 'boundary', 'initial'}  # no cut capped B: no plateau stages
    and plan.budget == 6
    and json.loads((output / 'plan.json').read_text())
  )
  # initial: 3 blocks x 2 recipes at the tuning seed; plain and identity under 'lecun-none' and their choice
  assert sorted(initialised) == [0] * 4 + [1] * 4 + [1000] * 6
  rows = protocol.read_rows(output / 'results.csv')
  assert sum(row['stage'] == 'initial' for row in rows) == len(initialised)
  boundary = [row for row in rows if row['stage'] == 'boundary']  # amendment 6: the primary all-skip arms, 3 classes
  assert sorted(row['block'] for row in boundary) == ['identity', 'plain']
  for row in boundary:
    (chosen,) = [r for r in rows if (r['stage'], r['arm'], r['seed']) == ('primary', row['arm'], 0)]
    assert row['data'] == 'synthetic_cells/three_class_small' and row['steps'] == 6
    assert (row['recipe'], row['learning_rate']) == (chosen['recipe'], chosen['learning_rate'])
  report = (output / 'report.md').read_text()
  verdicts = analysis.decisions(rows)
  assert len(verdicts) == 4 and 'None yet' not in report  # 4 claims x 1 dataset, once every stage is done
  for verdict in verdicts:
    assert f'| {verdict.claim}: {analysis.CLAIMS[verdict.claim]} | roads |' in report
    assert f'**{verdict.label}**' in report
  monkeypatch.setattr(runner, 'run_population', _fake_population(calls, fail_after=0))  # nothing left to train
  (output / 'report.md').unlink()
  again, _ = protocol.run(config, tmp_path / 'third', command=command)
  assert (output / 'results.csv').read_text() == table
  assert (output / 'report.md').read_text() == report  # rewritten, by the code that reads the table
  assert again == stages and len(initialised) == 14  # nothing measured again either
  # The study's command in an empty workdir (a fresh clone): nothing trained or measured, and the
  # tables are those protocol.run wrote (it once wrote them again after, without the baselines).
  (output / 'report.md').unlink()
  result = commands.run([sys.executable, 'studies/skip_residual/run.py', *args], env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (output / 'results.csv').read_text() == table and (output / 'report.md').read_text() == report


def test_where_cut_4_capped_b_the_verdict_stages_run_again_at_the_plateau(tfds_dir, tmp_path, monkeypatch):
  """Amendment 8: the primary and depth stages again at the plateau rule's budget (6 steps here,
  B capped at 4), the same arms and seeds, and the report's second verdict table is theirs."""
  output = tmp_path / 'tables'
  config = _quick_study(tfds_dir, output)
  config.ablation.protocol.budget_minutes = 1e-6  # every cut, cut 4 included
  config.ablation.protocol.plateau_stages = True
  monkeypatch.setattr(measures, 'initial', lambda run_config: {'log10_grad_ratio': -0.5 * run_config.model.residual})
  monkeypatch.setattr(runner, 'run_population', _fake_population([], residual_gain=0.005))
  stages, plan = protocol.run(config, tmp_path / 'work', command='c')
  assert plan.budget == 4 and 'budget_capped' in plan.cuts
  rows = protocol.read_rows(output / 'results.csv')

  def arms(stage):
    return sorted(
      (r['data'], r['arm'], r['recipe'], r['learning_rate'], r['depth'], r['seed'], r['steps'])
      for r in rows
      if r['stage'] == stage
    )

  for stage, repeated in protocol.PLATEAU_STAGES.items():
    assert arms(repeated) and {a[-1] for a in arms(repeated)} == {4} and {a[-1] for a in arms(stage)} == {6}
    assert [a[:-1] for a in arms(stage)] == [a[:-1] for a in arms(repeated)]
  report = (output / 'report.md').read_text()
  first, plateau_part = report.split('## Verdicts at the plateau budget (6 steps; PROTOCOL.md amendment 8)')
  for name in figures.PLATEAU_FIGURES:  # the verdict stages' figures again, from the plateau rows
    assert (output / name).stat().st_size > 1000 and f'![{name}]({name})' in plateau_part
  assert {r['steps'] for r in analysis.at_plateau(rows) if r['stage'] in ('primary', 'depth')} == {6}
  at_b, at_plateau = analysis.decisions(rows), analysis.decisions(analysis.at_plateau(rows))
  for verdict in at_plateau:
    line = f'| {verdict.claim}: {analysis.CLAIMS[verdict.claim]} | roads | '
    effect = verdict.decided.effect
    assert line + (f'{effect.format(3)} |' if effect.n > 1 else '') in plateau_part
  # claim 1 (the fake runs' validation Dice grows with steps for residual networks): larger at the plateau
  assert at_plateau[0].decided.effect.mean > at_b[0].decided.effect.mean > 0


def test_edges_keep_every_test_image(trained_run):
  from resunet_jax.training import restore

  workdir, _ = trained_run
  loaded = restore.load_run(workdir, 'latest', 'stock')
  out = measures.edges(loaded, 'test', per_image=True, widths=True)
  recalls = [out[f'recall_width_{name}'] for _, name in measures.WIDTH_BINS]
  assert any(np.isfinite(recalls)) and all(0 <= r <= 1 for r in recalls if np.isfinite(r))
  assert not any(key.endswith('_per_image') or key.startswith('recall') for key in measures.edges(loaded, 'test'))
  for name in measures.PER_IMAGE:
    values = out[f'{name}_per_image']
    assert len(values) == 16  # the small dataset's test split
    assert np.mean(values) == pytest.approx(out[name], abs=1e-6)  # the mean is over the same images


def test_the_studys_knockouts_add_mean_fills_and_deleted_branches_scored_on_validation_too(trained_run):
  from resunet_jax.training import restore

  workdir, _ = trained_run
  loaded = restore.load_run(workdir, 'latest', 'stock')
  out = measures.knockouts(loaded, 'test', loaded.model.config)
  assert set(out) == {'skip', 'skip_mean', 'residual', 'branch'}
  for table in out.values():
    assert len(table['labels']) == len(table['scales']) == len(table['dice']) == len(table['val_dice'])
  intact = out['skip']['dice'][-1]  # mask '11': nothing knocked out
  assert out['skip']['labels'][-1] == '11' and out['skip_mean']['dice'][-1] == pytest.approx(intact, abs=1e-6)
  assert out['residual']['dice'][0] == pytest.approx(intact, abs=1e-6) == out['branch']['dice'][0]
  assert out['skip_mean']['dice'][0] != out['skip']['dice'][0]  # both skips gone: the fill is not zero
  means = measures.skip_means(loaded)
  assert [m.shape for m in means] == [(w,) for w in loaded.model.config.widths()[:2]]
  assert all(np.isfinite(m).all() for m in means) and np.abs(means[0]).sum() > 0
  from resunet_jax import data

  images = np.concatenate(
    [b['image'] for b in data.make_pipeline(loaded.config.data, 'train', batch_size=8, seed=0, train=False)]
  )
  assert len(images) == 64  # the small dataset's training split, each image once
  _, captured = loaded.model.apply(
    loaded.variables, images, train=False, capture_intermediates=True, mutable=['intermediates']
  )
  for level, mean in enumerate(means):
    direct = np.asarray(captured['intermediates'][f'enc_{level}']['__call__'][0]).mean((0, 1, 2))
    np.testing.assert_allclose(mean, direct, rtol=1e-5, atol=1e-6)
  assert set(runner.measure_knockouts(loaded, 'test', loaded.model.config)) == {
    'skip',
    'residual',
  }  # a sweep's as before


def test_constant_dice_is_the_empty_prediction_scored_by_the_metric(tfds_dir, tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  for split, foreground in (('train', (1, 1)), ('validation', (1, 0, 1, 0, 0)), ('test', (1,))):
    for folder in ('images', 'masks'):
      (tmp_path / split / folder).mkdir(parents=True)
    for i, has in enumerate(foreground):
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / split / 'images' / f'{i}.png')
      mask = np.zeros((16, 16), np.uint8)
      mask[4:9, 3:7] = 255 * has
      Image.fromarray(mask).save(tmp_path / split / 'masks' / f'{i}.png')
  config = _quick_study(tfds_dir, 'unused')
  config.data.name, config.data.folder, config.data.image_size = 'folder', str(tmp_path), 16
  config.train.batch_size = 2  # the last batch is padded: padding is not an image
  # The empty prediction scores 1 on each of the 3 empty masks and 0 on the 2 others (`measures.image_scores`).
  assert measures.image_scores(np.zeros((16, 16), bool), np.zeros((16, 16), bool))['dice'] == 1.0
  assert protocol.constant_dice(protocol.base_config(config)) == pytest.approx(3 / 5)


def test_width_counts_bin_strokes_by_their_width():
  from PIL import Image, ImageDraw

  def stroke(width, row):
    image = Image.new('L', (48, 48))
    ImageDraw.Draw(image).line([(2, row), (45, row)], fill=1, width=width)
    return np.asarray(image) > 0

  for width, name in ((1, '1_2px'), (2, '1_2px'), (3, '3_4px'), (4, '3_4px'), (5, '5px'), (6, '5px')):
    truth = stroke(width, 24)
    counts = measures.width_counts(truth, truth)
    assert counts[f'true_{name}'] == counts[f'hit_{name}'] == truth.sum(), width
  thin, wide = stroke(1, 8), stroke(5, 30)
  counts = measures.width_counts(thin, thin | wide)  # the thin road found, the wide one missed
  assert counts['hit_1_2px'] == counts['true_1_2px'] == thin.sum() and counts['hit_5px'] == 0 < counts['true_5px']


def test_class_dice_scores_each_class_of_a_three_class_run(three_class_run):
  from resunet_jax.training import parallel, restore, steps

  workdir, _ = three_class_run
  loaded = restore.load_run(workdir, 'latest', 'stock')
  out = measures.class_dice(loaded, 'test')
  assert sorted(out) == ['class_dice_0', 'class_dice_1', 'class_dice_2']
  eval_fn = parallel.compile_eval(steps.eval_step, loaded.mesh)
  expected = {k: [] for k in range(3)}  # per image, by hand: 2|P & T| / (|P| + |T|), 1 when both are empty
  for batch, result in loaded.map_split(eval_fn, 'test'):
    for prediction, truth, valid in zip(result['predictions'], batch['mask'], batch['valid'], strict=True):
      for k in range(3):
        p, t = prediction == k, truth == k
        if valid:
          expected[k].append(1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum()))
  assert len(expected[2]) == 16  # the small dataset's test split
  for k in range(3):
    assert out[f'class_dice_{k}'] == pytest.approx(np.mean(expected[k]), abs=1e-6)
