"""The catalogue of bad inputs: each one ends in a single `error: ...` line (exit status 2) that
says what is wrong and what to do, or, through the Python API, in one exception of that kind.

Add a row whenever a new mistake is found. Data-set mistakes (folders, masks, label maps) are
catalogued in `tests/data/test_errors.py`; faults (kills, corrupt checkpoints, non-finite loss)
in `tests/training/`. docs/reliability.md lists them all.
"""

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from PIL import Image

from resunet_jax import data, inference, models
from resunet_jax.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = '--config=experiments/configs/quick.py'

# (script, arguments, fake devices, start of the single stderr line). RUN: a trained workdir;
# BARE: an existing folder that is not a run; TMP: a scratch folder.
CLI = {
  'unknown preset': ('train', ['--model=resnet'], 1, "error: unknown model preset 'resnet' (did you mean 'resunet'?)"),
  'mistyped config key': (
    'train',
    ['--config.model.base_widht=8'],
    1,
    'error: \'base_widht\' Did you mean "base_width"',
  ),
  'wrong value type': (
    'train',
    ['--config.model.depth=abc'],
    1,
    'error: flag --config.model.depth=abc: invalid literal',
  ),
  'mistyped choice': (
    'train',
    ['--config.model.norm=btach'],
    1,
    "error: ModelConfig.norm='btach' (did you mean 'batch'?)",
  ),
  'negative width': (
    'train',
    ['--config.model.base_width=-8'],
    1,
    'error: ModelConfig.base_width=-8 must be a positive',
  ),
  'depth too large': ('train', ['--config.model.depth=9'], 1, 'error: ModelConfig.depth=9 is above 8'),
  'skips of wrong length': ('train', ['--config.model.skips=10'], 1, "error: skips='10' has 2 entries but depth is 4"),
  'zero batch': ('train', [QUICK, '--config.train.batch_size=0'], 1, 'error: train.batch_size=0 must be a positive'),
  'batch not divisible by devices': (
    'train',
    [QUICK, '--config.train.batch_size=3'],
    2,
    'error: train.batch_size=3 must be a positive multiple of the device count (2)',
  ),
  'zero steps': ('train', [QUICK, '--config.train.num_steps=0'], 1, 'error: train.num_steps=0 must be at least 1'),
  'unknown optimizer': (
    'train',
    [QUICK, '--config.train.optimizer=adam_w'],
    1,
    "error: train.optimizer='adam_w' is not",
  ),
  'unknown strategy': (
    'train',
    [QUICK, '--config.parallel.strategy=pmapp'],
    1,
    "error: parallel.strategy='pmapp' is not",
  ),
  'unknown distributed mode': (
    'train',
    [QUICK, '--config.parallel.distributed=yes'],
    1,
    "error: parallel.distributed='yes'",
  ),
  'unknown dataset': (
    'train',
    ['--config.data.name=synthetic_cels'],
    1,
    "error: unknown dataset 'synthetic_cels' (did you",
  ),
  'dataset not prepared': (
    'train',
    ['--config.data.name=mnist'],
    1,
    "error: dataset 'mnist' split 'train' is not available",
  ),
  'folder without path': (
    'train',
    ['--config.data.name=folder'],
    1,
    "error: data.name='folder' needs data.folder=PATH",
  ),
  'missing data folder': (
    'train',
    ['--config.data.name=folder', '--config.data.folder=/no/such/folder'],
    1,
    'error: data.folder /no/such/folder does not exist',
  ),
  'missing config file': (
    'train',
    ['--config=experiments/configs/missing.py'],
    1,
    'error: Configuration is not available',
  ),
  'unknown flag': ('train', ['--bogus=1'], 1, "error: Unknown command line flag 'bogus'"),
  'stray argument': ('train', ['extra'], 1, "error: unexpected arguments ['extra']"),
  'workdir of another model': (
    'train',
    [QUICK, '--model=unet', '--workdir=RUN'],
    1,
    'error: workdir RUN holds checkpoints of',
  ),
  'deep supervision weights of the wrong length': (
    'train',
    [QUICK, '--model=unet_plusplus', '--config.train.deep_supervision_weights=(1.0,0.5,0.25)'],
    1,
    'error: train.deep_supervision_weights has 3 entries for a model with 2 heads',
  ),
  'pruning a network without nested skips': (
    'evaluate',
    ['--workdir=RUN', '--prune_level=1'],
    1,
    "error: --prune_level=1: prune_level was given but the model has skip_kind='concat'",
  ),
  'missing workdir': ('evaluate', ['--workdir=/no/such/run'], 1, 'error: workdir /no/such/run does not exist'),
  'workdir that is not a run': ('evaluate', ['--workdir=BARE'], 1, 'error: BARE/config.json is missing'),
  'missing checkpoint step': (
    'evaluate',
    ['--workdir=RUN', '--checkpoint=99'],
    1,
    "error: --checkpoint=99 is not 'best'",
  ),
  'unknown split': (
    'evaluate',
    ['--workdir=RUN', '--split=nope'],
    1,
    "error: dataset 'synthetic_roads/small' split 'nope'",
  ),
  'wrong input path': (
    'predict',
    ['--workdir=RUN', '--input=/no/such.png', '--output=TMP/out'],
    1,
    'error: --input=/no/such.png is neither',
  ),
  'folder without images': (
    'predict',
    ['--workdir=RUN', '--input=BARE', '--output=TMP/out'],
    1,
    'error: BARE holds no images',
  ),
  'zero-byte image': (
    'predict',
    ['--workdir=RUN', '--input=TMP/empty.png', '--output=TMP/out'],
    1,
    'error: cannot read image',
  ),
  'ablation config without a grid': (
    'ablate',
    ['--config=experiments/configs/quick.py', '--workdir=TMP/sweep'],
    1,
    'error: the config has no `ablation` section',
  ),
  'ablation with zero seeds': (
    'ablate',
    ['--config=experiments/configs/ablate_quick.py', '--config.ablation.seeds=0', '--workdir=TMP/sweep'],
    1,
    'error: ablation.seeds=0 must be at least 1',
  ),
  'ablation study of an unknown dataset': (
    'ablate',
    [
      '--config=experiments/configs/ablate_quick.py',
      '--config.ablation.studies.roads.data=synthetic_rods',
      '--workdir=TMP/sweep',
    ],
    1,
    "error: unknown dataset 'synthetic_rods'",
  ),
  'export to an unknown format': (
    'export',
    ['--workdir=RUN', '--format=tflite', '--output=TMP/exported'],
    1,
    'error: --format=tflite is not supported; use one of stablehlo, onnx',
  ),
  'predict from a run and an artefact at once': (
    'predict',
    ['--workdir=RUN', '--exported=BARE', '--input=BARE', '--output=TMP/out'],
    1,
    'error: pass either --workdir',
  ),
  'predict from a folder that is not an artefact': (
    'predict',
    ['--exported=BARE', '--input=BARE', '--output=TMP/out'],
    1,
    'error: BARE/model.json is missing',
  ),
  '16-bit images under fixed normalisation': (
    'train',
    [QUICK, '--config.data.name=folder', '--config.data.folder=WIDE'],
    1,
    "error: folder WIDE [train] 00000: uint16 pixels (0..65535); data.normalization='fixed'",
  ),
  'output not writable': (
    'predict',
    ['--workdir=RUN', '--input=split:test[:1]', '--output=/proc/forbidden'],
    1,
    'error: cannot create --output=/proc/forbidden',
  ),
}


@pytest.mark.parametrize('case', list(CLI))
def test_command_line_mistakes(case, trained_run, tmp_path, commands):
  script, args, devices, expected = CLI[case]
  workdir, env = trained_run
  bare = tmp_path / 'bare'
  bare.mkdir()
  (tmp_path / 'empty.png').write_bytes(b'')
  places = {'RUN': str(workdir), 'BARE': str(bare), 'TMP': str(tmp_path), 'WIDE': str(tmp_path / 'wide')}
  if any('WIDE' in a for a in args):  # a folder of one 16-bit image with values up to 65,535 per split
    for role in data.sources.SPLIT_ROLES:
      for sub in ('images', 'masks'):
        (tmp_path / 'wide' / role / sub).mkdir(parents=True)
      pixels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
      tifffile.imwrite(tmp_path / 'wide' / role / 'images' / '00000.tif', pixels)
      Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / 'wide' / role / 'masks' / '00000.png')
  for placeholder, path in places.items():
    args = [a.replace(placeholder, path) for a in args]
    expected = expected.replace(placeholder, path)
  env = {**env, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  result = commands.run([sys.executable, f'experiments/{script}.py', *args], env=env, timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_verbose_adds_the_traceback(commands):
  result = commands.run([sys.executable, 'experiments/train.py', '--model=resnet', '-v', '1'])
  assert result.returncode == 2 and 'Traceback (most recent call last)' in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: unknown model preset 'resnet'")


UNET = models.UNet(models.ModelConfig(base_width=2, depth=2))
X = jnp.zeros((1, 8, 8, 3))

API = {
  'unknown config field': (
    lambda: models.ModelConfig(base_widht=8),
    ValueError,
    "'base_widht' \\(did you mean 'base_width'",
  ),
  'unknown preset': (
    lambda: models.preset('resnet'),
    ValueError,
    'presets: unet, resunet, attention_unet, unet_plusplus, resunet_zhang',
  ),
  'skip_scale of wrong length': (
    lambda: UNet_apply(skip_scale=jnp.ones(3)),
    ValueError,
    r'skip_scale has shape \(3,\); it needs one multiplier per level: shape \(2,\)',
  ),
  'residual_scale on a plain network': (lambda: UNet_apply(residual_scale=jnp.ones(5)), ValueError, 'residual=False'),
  'image without batch axis': (
    lambda: UNET.init(jax_key(), X[0], train=False),
    ValueError,
    r'takes \[B, H, W, C\] images; got shape',
  ),
  'NaN pixels': (
    lambda: inference.sliding_window(lambda v, x: x, {}, np.full((8, 8, 3), np.nan), tile=8),
    ValueError,
    'image holds 192 non-finite values',
  ),
  'overlap of 1': (
    lambda: inference.sliding_window(lambda v, x: x, {}, np.zeros((8, 8, 3)), tile=8, overlap=1),
    ValueError,
    'overlap',
  ),
  'label map that is not int to int': (
    lambda: data.sources.label_lut({'x': 1}),
    DataError,
    'not an int-to-int mapping',
  ),
  'mask value out of range in a label map': (lambda: data.sources.label_lut({300: 1}), DataError, 'out of range'),
  'float image under fixed normalisation': (
    lambda: data.sources.check_image(np.zeros((4, 4, 3), np.float32), 'x', eight_bit=True),
    DataError,
    "float32 pixels .*; data.normalization='fixed' divides 8-bit pixels by 255 and would saturate",
  ),
  'image with pixels no reader decodes': (
    lambda: data.sources.check_image(np.zeros((4, 4, 3), np.uint32), 'x'),
    DataError,
    'uint32 pixels cannot be read; images are 8- or 16-bit integers or floats',
  ),
  'image with another channel count than the others': (
    lambda: data.sources.check_image(np.zeros((4, 4, 2), np.uint8), 'x', channels=3),
    DataError,
    r'image has 2 channels but data.channels is 3; every image needs the same channel count',
  ),
  'float image with NaN': (
    lambda: data.sources.check_image(np.full((4, 4, 1), np.nan, np.float32), 'x'),
    DataError,
    'image holds NaN or infinite values',
  ),
  'image for a model of other channels': (
    lambda: data.sources.fit_channels(np.zeros((4, 4, 2), np.uint8), 3, 'x'),
    DataError,
    'image has 2 channels, the model takes 3',
  ),
  'constant image under per-image normalisation': (
    lambda: data.sources.check_image(np.full((4, 4, 2), 7, np.uint16), 'x', varying=True),
    DataError,
    "x: channel 0 is constant; data.normalization='per_image' cannot scale it",
  ),
  'unknown normalisation': (
    lambda: data.normalization.check_kind('per-image'),
    DataError,
    r"data.normalization='per-image' is unknown \(did you mean 'per_image'\?\)",
  ),
  'channel constant over the training split': (
    lambda: data.normalization.compute('dataset_zscore', [{'image': np.ones((4, 4, 2), np.float32)}] * 2, show=False),
    DataError,
    'channel 0 has one value over the whole training split',
  ),
  'fixed mean of another channel count': (
    lambda: data.normalization.fixed((0.4, 0.5, 0.6), (0.25,) * 3, 1),
    DataError,
    'data.mean has 3 values but the images have 1 channels',
  ),
  'recorded statistics without std': (
    lambda: data.normalization.from_stats('dataset_zscore', 1, {'mean': [0.0]}),
    DataError,
    'is not a statistics record',
  ),
}


def jax_key():
  import jax

  return jax.random.key(0)


def UNet_apply(**scales):  # noqa: N802 (reads as the call it stands for)
  variables = UNET.init(jax_key(), X, train=False)
  return UNET.apply(variables, X, train=False, **scales)


@pytest.mark.parametrize('case', list(API))
def test_python_api_mistakes(case):
  build, error, message = API[case]
  with pytest.raises(error, match=message) as excinfo:
    build()
  assert '\n' not in str(excinfo.value)


def test_docs_list_every_case():
  listed = (ROOT / 'docs' / 'reliability.md').read_text()
  missing = [case for case in [*CLI, *API] if f'| {case} |' not in listed]
  assert not missing, f'add these to docs/reliability.md: {missing}'


def test_the_catalogue_is_long_enough():
  assert len(CLI) + len(API) >= 25  # and tests/data/test_errors.py adds the data-set mistakes
