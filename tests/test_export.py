"""Exported artefacts (resunet_jax/export.py, experiments/export.py, predict.py --exported):
StableHLO and ONNX agree with the JAX model, run without the package, and bad artefacts get
one-line errors."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resunet_jax import export, models
from resunet_jax.data.normalization import Normalization
from resunet_jax.errors import UserError
from resunet_jax.training import restore

ROOT = export.pathlib.Path(__file__).resolve().parents[1]
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
FIXED = Normalization('fixed', 3, MEAN, STD)
# 16-bit-like pixels in four channels, clipped to their percentiles inside; float pixels z-scored per image.
PERCENTILE = Normalization('percentile', 4, (9e3, 1e4, 2e4, 3e4), (4e3, 5e3, 6e3, 7e3), (50.0,) * 4, (6e4,) * 4)
PER_IMAGE = Normalization('per_image', 1)
TILE = 16


def _by_hand(norm, images):
  """The model inputs of pixel values, written out here from the rules' definitions in float64 (an
  oracle for `Normalization.__call__`, which the artefacts trace)."""
  x = np.asarray(images, np.float64)
  if norm.kind == 'per_image':  # per image and channel over its pixels
    return (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
  mean, std = np.asarray(norm.mean), np.asarray(norm.std)
  if norm.kind == 'fixed':
    return (x / 255 - mean) / std
  return (np.clip(x, norm.low, norm.high) - mean) / std  # percentile: clipped, then z-scored


def _logits(model, variables, images, norm=FIXED):
  """The JAX model's logits of pixel values normalised by hand."""
  inputs = _by_hand(norm, images)
  np.testing.assert_allclose(norm(images), inputs, rtol=1e-5, atol=1e-5)
  return np.asarray(model.apply(variables, inputs.astype(np.float32), train=False))


def _both_outputs(fmt, directory, images):
  """The artefact's own two outputs, (logits, probabilities), read from its model file."""
  if fmt == 'stablehlo':
    exported = jax.export.deserialize(bytearray((directory / export.FILES[fmt]).read_bytes()))
    return tuple(np.asarray(out) for out in exported.call(jnp.asarray(images)))
  import onnxruntime

  session = onnxruntime.InferenceSession(str(directory / export.FILES[fmt]), providers=['CPUExecutionProvider'])
  return tuple(session.run(['logits', 'probabilities'], {session.get_inputs()[0].name: images}))


@pytest.mark.parametrize(
  ('preset', 'classes', 'overrides', 'norm'),
  [
    ('unet', 1, {}, FIXED),
    ('resunet', 1, {}, PER_IMAGE),
    ('attention_unet', 1, {'deep_supervision': True}, FIXED),  # exported without its auxiliary heads
    ('unet_plusplus', 1, {}, FIXED),
    ('resunet_zhang', 1, {}, FIXED),
    ('resunet', 3, {}, PERCENTILE),
  ],
)
def test_both_formats_agree_with_the_jax_model(preset, classes, overrides, norm, tmp_path):
  model = models.UNet(
    models.preset(preset, base_width=4, depth=2, num_classes=classes, **overrides)
  )  # tiny, as in test_transformations
  variables = model.init(jax.random.key(0), jnp.zeros((1, TILE, TILE, norm.channels)), train=False)
  rng = np.random.default_rng(0)
  top = 255 if norm.kind == 'fixed' else 65535
  batch = rng.uniform(0, top, (3, TILE, TILE, norm.channels)).astype(np.float32)
  odd = rng.uniform(0, top, (1, 27, 19, norm.channels)).astype(np.float32)  # not a multiple of 2**depth: padded inside
  for fmt in export.FORMATS:
    export.export_model(model, variables, tmp_path / fmt, fmt=fmt, normalization=norm, tile=TILE, preset=preset)
    artefact = export.load(tmp_path / fmt)
    assert artefact.normalization == norm and artefact.card['input']['channels'] == norm.channels
    assert artefact.card['classes'] == max(2, classes) and artefact.card['model']['num_classes'] == classes
    assert fmt == 'onnx' or artefact.card['platforms'] == ['cpu', 'cuda', 'tpu']
    assert np.abs(artefact(batch) - _logits(model, variables, batch, norm)).max() <= 1e-4, fmt
    logits, probabilities = (np.asarray(out, np.float64) for out in _both_outputs(fmt, tmp_path / fmt, batch))
    if classes == 1:  # the card's contract: a sigmoid for a binary model, a softmax over K classes
      expected = 1 / (1 + np.exp(-logits))
    else:
      expected = np.exp(logits - logits.max(-1, keepdims=True))
      expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6, err_msg=fmt)
  assert export.load(tmp_path / 'stablehlo').tile is None  # one artefact for every size
  assert np.abs(export.load(tmp_path / 'stablehlo')(odd) - _logits(model, variables, odd, norm)).max() <= 1e-4
  onnx = export.load(tmp_path / 'onnx')
  assert onnx.tile == TILE and onnx.card['input']['height'] == TILE and onnx.card['opset'] == export.OPSET
  with pytest.raises(UserError, match=f'takes {TILE}x{TILE} inputs'):
    onnx(odd)


@pytest.mark.parametrize('preset', ['resunet', 'unet_plusplus'])
def test_a_volume_network_exports_in_both_formats(preset, tmp_path):
  config = models.preset(preset, base_width=2, depth=2, spatial_dims=3, pool_strides=((1, 2, 2), (2, 2, 2)))
  model, grey = models.UNet(config), Normalization('fixed', 1, (0.5,), (0.25,))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 8, 8, 1)), train=False)
  rng = np.random.default_rng(1)
  volume = rng.uniform(0, 255, (2, TILE, TILE, TILE, 1)).astype(np.float32)
  odd = rng.uniform(0, 255, (1, 5, 11, 9, 1)).astype(np.float32)
  expected = np.asarray(model.apply(variables, ((volume / 255 - 0.5) / 0.25).astype(np.float32), train=False))
  for fmt in export.FORMATS:
    export.export_model(model, variables, tmp_path / fmt, fmt=fmt, normalization=grey, tile=TILE, preset=preset)
    artefact = export.load(tmp_path / fmt)
    assert artefact.spatial_dims == 3 and artefact.card['input']['layout'] == 'NDHWC'
    assert np.abs(artefact(volume) - expected).max() <= 1e-4, fmt
  stablehlo = export.load(tmp_path / 'stablehlo')  # symbolic depth, height and width
  odd_expected = model.apply(variables, ((odd / 255 - 0.5) / 0.25).astype(np.float32), train=False)
  assert np.abs(stablehlo(odd) - np.asarray(odd_expected)).max() <= 1e-4
  with pytest.raises(UserError, match=r'takes \[N, D, H, W, 1\] inputs'):
    stablehlo(odd[:, 0])


def _mosaic(run_config, size=(203, 137)):
  """A large odd-sized image made of the run's test images (uint8), its own test data."""
  from resunet_jax import data

  source = data.open_split(run_config.data, 'test')
  tiles = [source[i]['image'] for i in range(len(source))]
  side = tiles[0].shape[0]
  rows = -(-size[0] // side)
  columns = -(-size[1] // side)
  grid = np.concatenate(
    [np.concatenate([tiles[(r * columns + c) % len(tiles)] for c in range(columns)], 1) for r in range(rows)], 0
  )
  return grid[: size[0], : size[1]]


def test_an_exported_run_predicts_the_masks_of_its_checkpoint(trained_run, commands, tmp_path):
  shared, env = trained_run
  workdir = tmp_path / 'run'
  shutil.copytree(shared, workdir)  # this test edits its config
  config = json.loads((workdir / 'config.json').read_text())
  config['runtime']['backend'] = 'cpu'  # a fast-backend run (oneDNN calls cannot be serialised): exported through stock
  (workdir / 'config.json').write_text(json.dumps(config))
  stablehlo, onnx = tmp_path / 'stablehlo', tmp_path / 'onnx'
  result = commands.run(
    [sys.executable, 'experiments/export.py', f'--workdir={workdir}', '--format=stablehlo', f'--output={stablehlo}'],
    env=env,
    cwd=ROOT,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  export.export_run(workdir, onnx, fmt='onnx')  # the library function behind the command
  run = restore.load_run(workdir, 'best', 'stock')
  card = json.loads((stablehlo / export.CARD).read_text())
  assert card['checkpoint_step'] == run.step and card['training_data']['name'] == run.config.data.name
  assert card['metrics']['validation']['step'] <= run.step and 'experiments/export.py' in card['command']
  assert card['training_data']['backend'] == 'cpu'
  images = tmp_path / 'images'
  images.mkdir()
  Image.fromarray(_mosaic(run.config)).save(images / 'mosaic.png')
  masks = {}
  for name, source in (
    ('workdir', f'--workdir={workdir}'),
    ('stablehlo', f'--exported={stablehlo}'),
    ('onnx', f'--exported={onnx}'),
  ):
    out = tmp_path / f'out_{name}'
    result = commands.run(
      [sys.executable, 'experiments/predict.py', source, f'--input={images}', f'--output={out}'], env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    masks[name] = np.asarray(Image.open(out / 'mosaic_mask.png'))
  assert masks['workdir'].shape == (203, 137) and 0 < masks['workdir'].mean() < 255  # a real mask, not a constant
  for name in ('stablehlo', 'onnx'):
    assert (masks[name] == masks['workdir']).mean() >= 0.9999, name
  loader = f'import sys; sys.path.insert(0, {str(stablehlo)!r}); import load, numpy as np; ' + (
    'out = load.predict(np.zeros((2, 40, 24, 3), np.float32)); '
    "assert out[0].shape == (2, 40, 24, 1) and not any(m.startswith('resunet_jax') for m in sys.modules); print('ok')"
  )
  result = subprocess.run([sys.executable, '-c', loader], capture_output=True, text=True, cwd=tmp_path, env=env)
  assert result.stdout.strip() == 'ok', result.stderr[-2000:]  # jax and numpy only


def test_bad_artefacts_get_one_line_errors(tmp_path, monkeypatch):
  model = models.UNet(models.preset('unet', base_width=4, depth=2))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  good = tmp_path / 'good'
  export.export_model(model, variables, good, fmt='stablehlo', normalization=FIXED, tile=8)
  with pytest.raises(UserError, match='not supported; use one of stablehlo, onnx'):
    export.export_model(model, variables, tmp_path / 'x', fmt='tflite', normalization=FIXED, tile=8)
  with pytest.raises(UserError, match='is not a folder'):
    export.load(tmp_path / 'nowhere')
  with pytest.raises(UserError, match='model.json is missing'):
    export.load(tmp_path)
  card = json.loads((good / export.CARD).read_text())
  cases = {
    'is not valid JSON': '{"format": ',
    "format 'tflite' is not supported": json.dumps({**card, 'format': 'tflite'}),
    'lacks classes, normalisation': json.dumps(
      {k: v for k, v in card.items() if k not in ('classes', 'normalisation')}
    ),
    'holds no model.onnx': json.dumps({**card, 'format': 'onnx', 'file': 'model.onnx'}),
    'says 4 channels': json.dumps({**card, 'input': {**card['input'], 'channels': 4}}),
  }
  for message, text in cases.items():
    (good / export.CARD).write_text(text)
    with pytest.raises(UserError, match=message):
      export.load(good)
  (good / export.CARD).write_text(json.dumps(card))
  with monkeypatch.context() as patch:  # an install without the export extra
    patch.setitem(sys.modules, 'flatbuffers', None)
    with pytest.raises(UserError, match=r"need flatbuffers \(the export extra\): pip install -e '\.\[export\]'"):
      export.load(good)
    with pytest.raises(UserError, match='need flatbuffers'):
      export.export_model(model, variables, tmp_path / 'y', fmt='stablehlo', normalization=FIXED, tile=8)
  (good / 'model.stablehlo').write_bytes(b'not flatbuffers')
  with pytest.raises(UserError, match='cannot be read as a jax.export artefact'):
    export.load(good)


def test_the_readme_orbax_snippet_restores_a_runs_parameters(trained_run):
  workdir, _ = trained_run
  text = (ROOT / 'docs' / 'export.md').read_text()
  snippet = text.split('<!-- plain-orbax -->')[1].split('```python')[1].split('```')[0]
  assert 'resunet_jax' not in snippet  # Orbax and JAX only
  namespace = {}
  exec(snippet, namespace)  # noqa: S102 (the docs' own code)
  step, params = namespace['restore_params'](str(workdir / 'checkpoints'))
  run = restore.load_run(workdir, 'latest', 'stock')
  assert step == run.step
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(run.state.params))
