"""The training command end to end: artefacts, a run moved across processes, devices and backends, failures.

Kills, SIGTERM and disk faults, each resumed bit-identical, are in test_faults.py.
"""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from resunet_jax import models
from resunet_jax.errors import UserError
from resunet_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICK = ['--config=experiments/configs/quick.py']


def _command(workdir, *args, model='resunet'):
  return [sys.executable, 'experiments/train.py', f'--model={model}', f'--workdir={workdir}', *args]


@pytest.fixture
def env(tfds_dir):
  return {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}


@pytest.fixture
def train(commands):
  """Runs the training command; asserts it succeeded."""

  def train(workdir, env, *args, model='resunet'):
    result = commands.run(_command(workdir, *args, model=model), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  return train


def _final_state(workdir):
  checkpoints = pathlib.Path(workdir) / 'checkpoints'
  step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  return step, ocp.StandardCheckpointer().restore((checkpoints / str(step) / 'state').absolute())


def _flatten(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_quick_config_writes_every_artefact(tmp_path, env, train):
  workdir = tmp_path / 'run'
  result = train(workdir, env, *QUICK)
  for name in ('config.json', 'metrics.jsonl', 'predictions.png', 'learning_curves.png', 'checkpoints', 'tensorboard'):
    assert str(workdir / name) in result.stdout, name
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['residual'] is True and config['model']['num_classes'] == 1
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in records if r['split'] == 'train']
  validation = [r for r in records if r['split'] == 'validation']
  assert [r['step'] for r in train] == [2, 3, 4, 6] and [r['step'] for r in validation] == [3, 6]
  assert {'loss', 'dice', 'iou', 'accuracy', 'grad_norm', 'grad_norm/enc_0', 'images_per_sec'} <= set(train[0])
  assert {'dice', 'iou', 'accuracy', 'boundary_f1', 'hd95'} <= set(validation[0])
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  for png in ('predictions.png', 'learning_curves.png'):
    assert Image.open(workdir / png).size[0] > 100
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['3', '6']
  assert 'validation: dice' in result.stdout


def test_residual_switch_trains_a_plain_unet_and_no_sample_images_means_no_figure(tmp_path, env, train):
  workdir = tmp_path / 'plain'
  args = ('--config.model.residual=False', '--config.train.num_steps=1', '--config.train.num_sample_images=0')
  result = train(workdir, env, *QUICK, *args)
  assert json.loads((workdir / 'config.json').read_text())['model']['residual'] is False
  assert not (workdir / 'predictions.png').exists() and 'predictions.png' not in result.stdout
  assert (workdir / 'learning_curves.png').exists()
  _, state = _final_state(workdir)
  names = set(_flatten(state['params']))
  assert names and not any('conv_proj' in name for name in names)
  assert "['enc_0']['conv1']['kernel']" in names


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, env, commands):
  workdir = tmp_path / 'nan'
  args = [*QUICK, '--config.train.learning_rate=1e38', '--config.train.grad_clip=0', '--config.train.num_steps=40']
  result = commands.run(_command(workdir, *args), env=env)
  assert result.returncode == 2
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith('error: loss became ') and 'at step' in message and 'last good checkpoint' in message
  kept = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  for step in kept:
    state = ocp.StandardCheckpointer().restore((workdir / 'checkpoints' / str(step) / 'state').absolute())
    assert all(np.isfinite(leaf).all() for leaf in _flatten(state['params']).values())


def test_workdir_of_another_model_is_refused(tmp_path, env, train, commands):
  workdir = tmp_path / 'taken'
  train(workdir, env, *QUICK, '--config.train.num_steps=3')
  result = commands.run(_command(workdir, *QUICK, model='unet'), env=env)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
    f'error: workdir {workdir} holds checkpoints of a different model (residual True -> False); '
    'use another --workdir or delete it'
  )


def test_three_classes_with_the_per_device_strategy(three_class_run):
  workdir, _ = three_class_run  # trained with pmap on 2 devices (conftest)
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['num_classes'] == 3 and config['parallel']['strategy'] == 'pmap'
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(r['dice']) for r in records)
  assert [r['learning_rate'] for r in records if r['split'] == 'train'][:2] == pytest.approx([0.0005, 0.001])


def _train_records(workdir):
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r['step'] for r in records if r['split'] == 'train']


def test_one_run_moves_across_processes_devices_and_backends(tmp_path, env, train, commands):
  """2 processes x 2 devices (stock layers) -> 1 device (CPU layers) -> 4 devices (stock): each stage
  restores the previous stage's checkpoint and trains on; none starts over."""
  import portpicker

  from resunet_jax import runtime

  workdir = tmp_path / 'moving'
  port = portpicker.pick_unused_port()
  two = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  processes = [
    commands.start(
      _command(
        workdir,
        *QUICK,
        '--config.train.num_steps=3',
        f'--config.parallel.coordinator_address=127.0.0.1:{port}',
        '--config.parallel.num_processes=2',
        f'--config.parallel.process_id={i}',
      ),
      env=two,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in processes]
  for process, (_, err) in zip(processes, outputs, strict=True):
    assert process.returncode == 0, err[-3000:]
  assert 'finished at step 3' in outputs[0][0] and 'predictions' in outputs[0][0]
  assert _train_records(workdir) == [2, 3]

  backend = 'cpu' if runtime.cpu_backend_available() else 'stock'
  one = train(workdir, env, *QUICK, '--config.train.num_steps=6', f'--config.runtime.backend={backend}')
  assert 'finished at step 6' in one.stdout
  # Restored, not started over: the two processes' data position cannot be, and says so.
  assert 'holds the data position of 2 processes, this run has 1: the state resumes' in one.stderr
  assert _train_records(workdir) == [2, 3, 4, 6]

  four = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  more = train(workdir, four, *QUICK, '--config.train.num_steps=9', '--config.runtime.backend=stock')
  assert 'finished at step 9' in more.stdout and 'data position' not in more.stderr
  assert _train_records(workdir) == [2, 3, 4, 6, 8, 9]  # a fresh start would log 2, 3, ... again
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())[-1] == 9


def test_latest_link_follows_the_newest_default_workdir(tmp_path):
  from resunet_jax.training import loop

  for name in ('run-a', 'run-b'):
    loop._link_latest(tmp_path / name)
    assert (tmp_path / 'latest').resolve() == (tmp_path / name).resolve()
  (tmp_path / 'latest').unlink()
  (tmp_path / 'latest').mkdir()  # a real folder of that name is never replaced
  loop._link_latest(tmp_path / 'run-c')
  assert not (tmp_path / 'latest').is_symlink()


def test_a_run_saved_before_a_model_field_existed_resumes_as_the_same_model(tmp_path):
  """config.json of a run from before `skip_kind` and `deep_supervision`: those fields had their
  defaults then, so the run's model is today's default model, not a different one."""
  resolved = {'model': models.ModelConfig(residual=True).to_dict()}
  saved = {'model': {k: v for k, v in resolved['model'].items() if k not in ('skip_kind', 'deep_supervision')}}
  loop._check_same_model(saved, resolved, tmp_path)  # no error
  other = {'model': {**resolved['model'], 'deep_supervision': True}}
  with pytest.raises(UserError, match=r'different model \(deep_supervision False -> True\)'):
    loop._check_same_model(saved, other, tmp_path)
