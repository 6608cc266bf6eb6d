"""The skip-path presets through the README's commands: `attention_unet` and `unet_plusplus` train,
evaluate, predict and export; a UNet++ resumes bit-identical with its auxiliary heads and does
all of it pruned too (a plain resume: tests/training/test_faults.py)."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resunet_jax import export, models

QUICK = ['--config=experiments/configs/quick.py']


def _state(workdir, step):
  restored = ocp.StandardCheckpointer().restore((workdir / 'checkpoints' / str(step) / 'state').absolute())
  return {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(restored)}


@pytest.mark.parametrize('preset', ['attention_unet', 'unet_plusplus'])
def test_a_skip_preset_trains_evaluates_predicts_and_exports(preset, tmp_path, tfds_dir, commands):
  env = {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'XLA_FLAGS': ''}

  def tool(script, *args):
    result = commands.run([sys.executable, f'experiments/{script}.py', *args], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  workdir = tmp_path / 'run'
  tool('train', f'--model={preset}', *QUICK, f'--workdir={workdir}')  # checkpoints 3 and 6
  config = json.loads((workdir / 'config.json').read_text())['model']
  assert config['skip_kind'] == {'attention_unet': 'attention', 'unet_plusplus': 'nested'}[preset]
  assert config['deep_supervision'] == (preset == 'unet_plusplus')

  if preset == 'unet_plusplus':  # its auxiliary heads are state a resume must carry (gates hold none)
    # A run that lost its last checkpoint resumes from step 3 and ends where the whole run did.
    resumed = tmp_path / 'resumed'
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '6')
    tool('train', f'--model={preset}', *QUICK, f'--workdir={resumed}')
    whole, again = _state(workdir, 6), _state(resumed, 6)
    assert whole.keys() == again.keys() and any('aux_1' in k for k in whole)
    for key in whole:
      np.testing.assert_array_equal(again[key], whole[key], err_msg=key)

  pruned = ['--prune_level=1'] if preset == 'unet_plusplus' else []
  tool('evaluate', f'--workdir={workdir}', '--split=test[:4]', *pruned)
  record = json.loads(next(workdir.glob('eval_test*.json')).read_text())
  assert record['images'] == 4 and record.get('prune_level') == (1 if pruned else None)
  tool('predict', f'--workdir={workdir}', '--input=split:test[:1]', f'--output={tmp_path / "masks"}', *pruned)
  assert len(list((tmp_path / 'masks').glob('test_*_mask.png'))) == 1
  tool('export', f'--workdir={workdir}', f'--output={tmp_path / "artefact"}', *pruned)
  artefact = export.load(tmp_path / 'artefact')
  card = models.ModelConfig.from_dict(artefact.card['model'])
  assert card.skip_kind == config['skip_kind'] and card.depth == (1 if pruned else 2)
