"""Populations: every member is its run alone (seeds, learning rates, residual scales, the plain model
as a residual one scaled by 0), a killed population resumes bit-identical, a diverging member stops
alone, and members are evaluated one by one.
"""

import json
import os
import pathlib
import random
import runpy
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resunet_jax import configs, models
from resunet_jax.ablation import grid
from resunet_jax.errors import UserError
from resunet_jax.training import population

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name('fault_worker.py')
QUICK = ['--model=resunet', '--config=experiments/configs/quick.py']
# 2 members of seed 1 at an injected learning rate 3e-3 (the config's is 1e-3): residual scale 1, then 0.
CROSSED = [
  '--config.seed=1',
  '--config.population.learning_rates=(3e-3,)',
  '--config.population.residual_scales=(1.0,0.0)',
  '--config.runtime.members=vmap',
]
TOLERANCE = 1e-5  # vmapped members against their runs alone (measured: 1.2e-7 after 6 steps)


@pytest.fixture(scope='module')
def env(tfds_dir):
  return {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}


@pytest.fixture(scope='module')
def tool(commands, env):
  def tool(script, *args, fault=None):
    command = [sys.executable, str(WORKER) if fault else f'experiments/{script}.py', *args]
    result = commands.run(command, env={**env, 'FAULT': fault} if fault else env)
    return result

  return tool


def _train(tool, workdir, *args, fault=None):
  result = tool('train', *QUICK, f'--workdir={workdir}', *args, fault=fault)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _state(workdir):
  checkpoints = pathlib.Path(workdir) / 'checkpoints'
  step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  return ocp.StandardCheckpointer().restore((checkpoints / str(step) / 'state').absolute())


def _params(state, member=None):
  leaves = jax.tree_util.tree_leaves_with_path(state['params'])
  return {jax.tree_util.keystr(path): np.asarray(leaf if member is None else leaf[member]) for path, leaf in leaves}


@pytest.fixture(scope='module')
def crossed(shared, tool):
  """The 2-member population of CROSSED, vmapped, quick config (6 steps): this worker's copy."""
  return shared.copy(shared.build('population_crossed', lambda workdir: _train(tool, workdir, *CROSSED)))


SEEDS = ['--config.population.seeds=2', '--config.train.learning_rate=3e-3']
ALONE = ['--config.seed=1', '--config.train.learning_rate=3e-3']


@pytest.fixture(scope='module')
def seeds(shared, tool):
  """Seeds 0 and 1 at rate 3e-3, looped (the CPU default), quick config: the uninterrupted reference."""
  return shared.build('population_seeds', lambda workdir: _train(tool, workdir, *SEEDS))


@pytest.fixture(scope='module')
def alone(shared, tool):
  """The run of seed 1 at rate 3e-3 on its own (a population of one)."""
  return shared.build('population_alone', lambda workdir: _train(tool, workdir, *ALONE))


def test_a_vmapped_member_is_its_run_alone(crossed, alone):
  expected, actual = _params(_state(alone), 0), _params(_state(crossed), 0)
  assert actual.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_allclose(actual[key], value, atol=TOLERANCE, rtol=0, err_msg=key)


def test_a_residual_member_scaled_by_0_is_the_plain_run(crossed, tool, tmp_path):
  _train(tool, tmp_path / 'plain', *ALONE, '--config.model.residual=False')
  expected, actual = _params(_state(tmp_path / 'plain'), 0), _params(_state(crossed), 1)
  assert {k for k in actual if 'conv_proj' not in k} == expected.keys()  # its unused projections aside
  for key, value in expected.items():
    np.testing.assert_allclose(actual[key], value, atol=TOLERANCE, rtol=0, err_msg=key)


def test_a_looped_member_is_bit_identical_to_its_run_alone(seeds, alone):
  expected, looped = _params(_state(alone), 0), _state(seeds)
  for key, value in expected.items():  # member 1 of seeds 0, 1 is the run of seed 1
    np.testing.assert_array_equal(_params(looped, 1)[key], value, err_msg=key)
  key = next(iter(expected))
  assert not np.array_equal(_params(looped, 0)[key], expected[key])  # seed 0 is a run of its own


def test_a_population_killed_at_a_random_step_resumes_bit_identical(seeds, tool, tmp_path):
  step = random.Random().randint(1, 6)  # any step must do; the message names the one drawn
  workdir = tmp_path / 'killed'
  killed = tool('train', *QUICK, f'--workdir={workdir}', *SEEDS, fault=f'step:{step}')
  assert killed.returncode == -9, f'step {step}: {killed.stderr[-2000:]}'
  _train(tool, workdir, *SEEDS)
  expected, actual = _state(seeds), _state(workdir)
  for name in ('params', 'opt_state', 'step', 'stopped_at'):
    flat = jax.tree_util.tree_leaves_with_path(expected[name])
    for (path, value), other in zip(flat, jax.tree_util.tree_leaves(actual[name]), strict=True):
      np.testing.assert_array_equal(other, value, err_msg=f'killed at step {step}: {name}{jax.tree_util.keystr(path)}')


def test_a_diverging_member_stops_alone_and_the_others_train_on(tool, tmp_path):
  workdir = tmp_path / 'diverging'
  result = _train(tool, workdir, '--config.population.learning_rates=(1e-3,1e38)', '--config.train.grad_clip=0')
  lines = [line for line in result.stderr.splitlines() if line.startswith('member 1 (seed 0, lr 1e+38')]
  assert len(lines) == 1 and 'stopped at step' in lines[0] and '1 other members train on' in lines[0], result.stderr
  stopped = int(lines[0].split('stopped at step ')[1].split(':')[0])
  state = _state(workdir)
  assert state['stopped_at'].tolist() == [0, stopped]
  assert all(np.isfinite(leaf).all() for leaf in _params(state).values())  # the last finite state is kept
  records = [map(json.loads, (workdir / 'members' / m / 'metrics.jsonl').read_text().splitlines()) for m in '01']
  steps = [[r['step'] for r in member if r['split'] == 'train'] for member in records]
  assert 6 in steps[0] and all(step < stopped for step in steps[1])


def test_members_are_evaluated_one_by_one(crossed, tool):
  result = tool('evaluate', f'--workdir={crossed}', '--member=1', '--checkpoint=latest')
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((crossed / 'members' / '1' / 'eval_test.json').read_text())
  assert record['checkpoint_step'] == 6 and 0 <= record['metrics']['dice']['mean'] <= 1
  wrong = tool('evaluate', f'--workdir={crossed}', '--member=2')
  assert wrong.returncode == 2
  assert wrong.stderr.strip().splitlines()[-1] == f'error: --member=2 is not a member of {crossed}: it has 2 (0 to 1)'


def _config(**population_fields):
  config = configs.base_config()
  for name, value in population_fields.items():
    config.population[name] = value
  return config


def test_members_cross_seeds_rates_decays_and_scales():
  config = _config(seeds=2, learning_rates=(1e-3, 3e-3), residual_scales=(1.0, 0.0))
  members = population.members(config, models.preset('resunet'))
  first = [(m.seed, m.learning_rate, m.residual_scale) for m in members[:3]]
  assert first == [(0, 1e-3, 1.0), (0, 1e-3, 0.0), (0, 3e-3, 1.0)]
  assert len(members) == 8 and members[7].label == 'seed 1, lr 0.003, wd 0.0001, residual_scale 0'
  alone = population.member_config(config, members[7])
  assert (alone.seed, alone.train.learning_rate, tuple(alone.population.residual_scales)) == (1, 3e-3, (0.0,))


@pytest.mark.parametrize(
  'fields, preset, message',
  [
    ({'seeds': 0}, 'resunet', 'population.seeds=0 must be a whole number of at least 1'),
    ({'learning_rates': (1e-3, -1.0)}, 'resunet', 'must be positive'),
    ({'residual_scales': (0.0,)}, 'unet', 'needs a model with residual shortcuts'),
  ],
)
def test_population_mistakes_are_one_line_errors(fields, preset, message):
  with pytest.raises(UserError, match=message):
    population.members(_config(**fields), models.preset(preset))


def test_a_zeroed_skip_is_refused_as_a_stand_in_for_a_skipless_arm():
  residual = models.preset('resunet', depth=2)
  assert population.stand_in_reason(residual, models.preset('resunet', depth=2, residual=False)) is None
  reason = population.stand_in_reason(residual, models.preset('resunet', depth=2, skips='none'))
  assert "a zeroed skip keeps the decoder's larger fan-in" in reason
  assert 'depth' in population.stand_in_reason(residual, models.preset('resunet', depth=3))
  assert 'no shortcuts' in population.stand_in_reason(models.preset('unet', depth=2), residual)
  identity = models.preset('resunet', depth=2, shortcut='identity')
  plain = models.preset('unet', depth=2)
  assert "keep each block's input projection conv_in" in population.stand_in_reason(identity, plain)
  assert 'shortcut differ' in population.stand_in_reason(residual, identity)
  assert 'init differ' in population.stand_in_reason(residual, models.preset('unet', depth=2, init='he'))


def test_the_default_grid_groups_each_skip_variant_into_one_population():
  specs = grid.run_specs(configs_from_file('ablate.py'))
  groups = grid.populations(specs)
  assert len(groups) == 8 and sorted(len(g.runs) for g in groups) == [6] * 8  # 3 seeds x plain/residual
  grouped = [spec for group in groups for spec in group.runs]
  assert len(grouped) == len(specs) and set(grouped) == set(specs)
  for group in groups:
    members = population.members(group.config, configs.resolve_model(group.config.preset, group.config.model))
    for member, spec in zip(members, group.runs, strict=True):
      assert (member.seed, member.residual_scale) == (spec.seed, 1.0 if spec.residual else 0.0)
  assert len(grid.populations(specs, group=False)) == len(specs)


def configs_from_file(name):
  return runpy.run_path(str(ROOT / 'experiments' / 'configs' / name))['get_config']()
