"""A 3-D run from the commands a user types: the volume config trains on the embedded vessels,
resumes bit-identical after SIGKILL, evaluates with surface Dice and predicts a NIfTI volume larger
than its patch onto the input's grid."""

import json
import os
import pathlib
import signal
import sys

import jax
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

WORKER = pathlib.Path(__file__).with_name('fault_worker.py')
# experiments/configs/volumes.py shrunk: 16^3 patches of the 32^3 test volumes, 4 steps.
ARGS = [
  '--model=resunet',
  '--config=experiments/configs/volumes.py',
  '--config.data.name=synthetic_vessels/small',
  '--config.data.patch_size=16',
  '--config.model.base_width=2',
  '--config.model.depth=2',
  '--config.train.num_steps=4',
  '--config.train.checkpoint_every=2',
  '--config.train.eval_every=2',
  '--config.train.warmup_steps=1',
  '--config.train.num_sample_images=1',
]


@pytest.fixture(scope='module')
def env(tfds_dir):
  return {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}


def _train(commands, workdir, env, fault=None):
  command = [sys.executable, 'experiments/train.py'] if fault is None else [sys.executable, str(WORKER)]
  return commands.run([*command, *ARGS, f'--workdir={workdir}'], env=env if fault is None else {**env, 'FAULT': fault})


def _final(workdir):
  checkpoints = pathlib.Path(workdir) / 'checkpoints'
  step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore((checkpoints / str(step) / 'state').absolute())
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope='module')
def volume_run(shared, env, commands):
  def build(workdir):
    result = _train(commands, workdir, env)
    assert result.returncode == 0, result.stderr[-3000:]

  return shared.build('volume_run', build)


def test_a_3d_run_is_a_3d_network_with_surface_dice_and_resumes_bit_identical_after_sigkill(
  volume_run, tmp_path, env, commands
):
  config = json.loads((volume_run / 'config.json').read_text())
  assert config['model']['spatial_dims'] == 3 and config['model']['pool_strides'] == [[2, 2, 2], [2, 2, 2]]
  validation = [json.loads(line) for line in (volume_run / 'metrics.jsonl').read_text().splitlines()]
  assert any(row.get('split') == 'validation' and 0 <= row['surface_dice'] <= 1 for row in validation), validation
  killed = _train(commands, tmp_path, env, 'step:3')  # after the checkpoint of step 2
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = _train(commands, tmp_path, env)
  assert resumed.returncode == 0 and 'finished at step 4' in resumed.stdout, resumed.stderr[-3000:]
  (step, expected), (resumed_step, actual) = _final(volume_run), _final(tmp_path)
  assert step == resumed_step == 4 and expected.keys() == actual.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_a_3d_run_predicts_a_nifti_larger_than_its_patch_onto_the_input_grid(
  volume_run, shared, tmp_path, env, commands
):
  affine = np.diag([2.0, 0.8, 0.8, 1.0])
  affine[:3, 3] = (-40.0, 12.5, 7.0)
  voxels = np.random.default_rng(0).integers(0, 255, (20, 40, 24)).astype(np.uint8)
  nib.save(nib.Nifti1Image(voxels, affine), tmp_path / 'case.nii.gz')
  result = commands.run(
    [
      sys.executable,
      'experiments/predict.py',
      f'--workdir={volume_run}',
      f'--input={tmp_path / "case.nii.gz"}',
      f'--output={tmp_path / "out"}',
      '--checkpoint=latest',
    ],
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  written = nib.load(tmp_path / 'out' / 'case_mask.nii.gz')
  assert written.shape == voxels.shape and set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
  np.testing.assert_array_equal(written.affine, nib.load(tmp_path / 'case.nii.gz').affine)  # as stored (float32)
  assert (tmp_path / 'out' / 'case_overlay.png').is_file()
  flat = tmp_path / 'flat.png'
  Image.fromarray(voxels[0]).save(flat)
  refused = commands.run(
    [sys.executable, 'experiments/predict.py', f'--workdir={volume_run}', f'--input={flat}', f'--output={tmp_path}'],
    env=env,
  )
  assert refused.returncode == 2 and 'is a 2-D image and this is a 3-D model' in refused.stderr.strip().splitlines()[-1]
  copy = shared.copy(volume_run)  # evaluate.py writes into the workdir
  evaluated = commands.run(
    [sys.executable, 'experiments/evaluate.py', f'--workdir={copy}', '--split=test', '--checkpoint=latest'], env=env
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  record = json.loads((copy / 'eval_test.json').read_text())
  assert record['images'] == 4 and 0.0 <= record['metrics']['surface_dice']['mean'] <= 1.0
