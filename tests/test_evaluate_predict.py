"""experiments/evaluate.py and predict.py on a quick-config run: files exist and parse; bad inputs."""

import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _with_tools(run, commands):
  """A (workdir, env) run fixture as (workdir, run(script, *args)) for the `experiments/` tools."""
  workdir, env = run

  def tool(script, *args):
    return commands.run([sys.executable, f'experiments/{script}.py', *args], env=env)

  return workdir, tool


@pytest.fixture
def trained(trained_run, commands):
  return _with_tools(trained_run, commands)


def _best_validation_step(workdir):
  """The checkpointed step with the highest validation Dice, read from metrics.jsonl (the later of ties)."""
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  validation = [r for r in records if r['split'] == 'validation']
  assert [r['step'] for r in validation] == [3, 6]  # both checkpointed, so either can be best
  return max(validation, key=lambda r: (r['dice'], r['step']))['step']


@pytest.mark.parametrize('checkpoint', ['best', 'latest', '3'])
def test_evaluate_writes_json_and_markdown(trained, checkpoint):
  workdir, run = trained
  result = run('evaluate', f'--workdir={workdir}', '--split=test', f'--checkpoint={checkpoint}')
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / 'eval_test.json').read_text())
  assert record['images'] == 16 and record['split'] == 'test' and record['boundary_tolerance_px'] == 2.0
  assert record['checkpoint_step'] == {'3': 3, 'latest': 6, 'best': _best_validation_step(workdir)}[checkpoint]
  for name in ('dice', 'iou', 'accuracy', 'boundary_f1', 'hd95'):
    stats = record['metrics'][name]
    assert stats['p5'] <= stats['median'] <= stats['p95']
  table = (workdir / 'eval_test.md').read_text()
  assert '| dice |' in table and '| hd95 |' in table and table in result.stdout


def test_predict_on_files_of_any_size_and_channel_count(trained, tmp_path):
  workdir, run = trained
  inputs = tmp_path / 'in'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (150, 97, 3), dtype=np.uint8)).save(inputs / 'big.png')
  Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(inputs / 'grey.png')
  Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(inputs / 'rgba.png')
  out = tmp_path / 'out'
  result = run('predict', f'--workdir={workdir}', f'--input={inputs}', f'--output={out}', '--probabilities', '--tta')
  assert result.returncode == 0, result.stderr[-3000:]
  for stem, shape in (('big', (150, 97)), ('grey', (20, 30)), ('rgba', (40, 40))):
    mask = np.asarray(Image.open(out / f'{stem}_mask.png'))
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(out / f'{stem}_overlay.png')).shape == (*shape, 3)
    probabilities = np.load(out / f'{stem}_probabilities.npy')
    assert probabilities.shape == (*shape, 1) and ((probabilities >= 0) & (probabilities <= 1)).all()
    np.testing.assert_array_equal(mask > 0, probabilities[..., 0] > 0.5)


def test_predict_on_a_split_of_the_runs_dataset(trained, tmp_path):
  workdir, run = trained
  result = run('predict', f'--workdir={workdir}', '--input=split:test[:2]', f'--output={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(list(tmp_path.glob('test_*_overlay.png'))) == 2


def test_whole_image_evaluation_scores_what_predict_writes(trained, trained_run, tmp_path):
  """evaluate.py --evaluation=whole scores each 64x64 test image at its own size (the run trained
  at 32x32): its per-image Dice is that of predict.py's masks scored by hand against the truth."""
  workdir, run = trained
  result = run('evaluate', f'--workdir={workdir}', '--split=test', '--evaluation=whole', '--checkpoint=latest')
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / 'eval_test_whole.json').read_text())
  assert record['evaluation'] == 'whole' and record['images'] == 16
  result = run('predict', f'--workdir={workdir}', '--input=split:test', f'--output={tmp_path}', '--checkpoint=latest')
  assert result.returncode == 0, result.stderr[-3000:]
  import ml_collections

  from resunet_jax import data

  data_config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text())['data'])
  data_config.data_dir = trained_run[1]['TFDS_DATA_DIR']
  source = data.open_split(data_config, 'test')
  scores = []
  for i in range(len(source)):
    truth = np.asarray(source[i]['mask']) > 0
    mask = np.asarray(Image.open(tmp_path / f'{source[i]["id"]}_mask.png')) > 0
    assert mask.shape == truth.shape == (64, 64)  # at the image's own size
    both = (mask & truth).sum()
    scores.append(1.0 if not (mask.any() or truth.any()) else 2 * both / (mask.sum() + truth.sum()))
  assert record['metrics']['dice']['mean'] == pytest.approx(float(np.mean(scores)), abs=1e-6)


@pytest.fixture
def three_classes(three_class_run, commands):
  return _with_tools(three_class_run, commands)


def test_evaluate_a_three_class_run_reports_every_class(three_classes):
  workdir, run = three_classes
  result = run('evaluate', f'--workdir={workdir}', '--split=test', '--checkpoint=latest')
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / 'eval_test.json').read_text())
  assert len(record['class_dice']) == 3 and all(0 <= d <= 1 for d in record['class_dice'])
  # Dice is per image, classes averaged within it, so its mean is the mean of the per-class means.
  assert record['metrics']['dice']['mean'] == pytest.approx(np.mean(record['class_dice']), abs=1e-6)
  for name in ('boundary_f1', 'hd95'):  # boundaries of every class, averaged
    assert np.isfinite(record['metrics'][name]['mean'])
  table = (workdir / 'eval_test.md').read_text()
  assert '| class | Dice |' in table
  for index, value in enumerate(record['class_dice']):
    assert f'| {index} | {value:.4f} |' in table


def test_predict_with_three_classes_writes_class_ids_and_per_class_probabilities(three_classes, tmp_path):
  workdir, run = three_classes
  result = run('predict', f'--workdir={workdir}', '--input=split:test[:2]', f'--output={tmp_path}', '--probabilities')
  assert result.returncode == 0, result.stderr[-3000:]
  stems = sorted(p.name.removesuffix('_mask.png') for p in tmp_path.glob('*_mask.png'))
  assert len(stems) == 2
  for stem in stems:
    mask = np.asarray(Image.open(tmp_path / f'{stem}_mask.png'))
    probabilities = np.load(tmp_path / f'{stem}_probabilities.npy')
    assert probabilities.shape == (*mask.shape, 3)  # [H, W, K]: one map per class
    np.testing.assert_allclose(probabilities.sum(-1), 1, rtol=1e-5)  # a softmax over the classes
    assert set(np.unique(mask)) <= {0, 1, 2}  # class ids, not 0/255
    np.testing.assert_array_equal(mask, probabilities.argmax(-1))
