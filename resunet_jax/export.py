"""Exported models: a trained run as an artefact that runs without this package.

An artefact is a folder:

  model.stablehlo | model.onnx   the inference function (below), serialised
  model.json                     the model card (`card`): format, input and output contract,
                                 preset and ModelConfig, normalisation, classes and label map,
                                 training data, validation and test metrics, commit, command
  load.py                        (StableHLO only) a loader that needs only jax and numpy

The inference function takes `images`, float32 `[N, H, W, C]` pixel values as the training files
hold them (a uint8 image converted to float: 0..255; a 16-bit one: 0..65535), normalises them by
the run's rule and statistics (`data.normalization`, `data.stats`; the card's `normalisation`),
and returns
`(logits, probabilities)`, both float32 `[N, H, W, K]`: K = 1 with a sigmoid (binary), else a
softmax. The stock layers are always what is exported: the CPU backend's oneDNN calls have no
serialisation guarantee (`jax.export` refuses them), and any run restores into the stock model.

- StableHLO (`jax.export`): N, H and W are symbolic, so one artefact takes every size; the model
  pads H and W (centred) to a multiple of 2**depth inside and crops back. Lowered for the
  platforms in `PLATFORMS` (CPU, CUDA and TPU) in one artefact.
- ONNX (`jax2onnx`, opset `OPSET`): N is dynamic, H = W = the tile size, fixed: jax2onnx cannot
  yet prove that the upsampled and skip tensors of a symbolic H and W agree at the decoder's
  concatenations. The card says so (`input.height`), and `predict.py --exported` runs it tile
  by tile. Checked with `onnx.checker`.

A volume network (`ModelConfig.spatial_dims=3`) exports the same way with `[N, D, H, W, C]`
inputs (ONNX: D = H = W = the tile size; the card's layout says NDHWC).

`load(directory)` reads any artefact back as an `Exported` (the model card checked against the
file) whose call returns the logits, for `experiments/predict.py --exported`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import pathlib
import subprocess
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from resunet_jax.data import normalization as normalization_lib
from resunet_jax.data.normalization import Normalization
from resunet_jax.errors import DataError, UserError

FORMATS = ('stablehlo', 'onnx')
FILES = {'stablehlo': 'model.stablehlo', 'onnx': 'model.onnx'}
CARD = 'model.json'
PLATFORMS = ('cpu', 'cuda', 'tpu')  # StableHLO lowerings, in order of preference (the card lists those made)
OPSET = 21
CARD_VERSION = 2  # 2: `normalisation` (rule and statistics) and any channel count; 1: 8-bit RGB, mean and std

LOADER = '''"""Runs the exported model beside this file with jax and numpy only (no resunet_jax).

  from load import predict
  logits, probabilities = predict(images)   # images: float32 [N, H, W, C] pixel values as in training

See model.json for the classes, the channels and the training data's normalisation (inside).
"""

import json
import pathlib

import numpy as np
from jax import export

_HERE = pathlib.Path(__file__).resolve().parent
CARD = json.loads((_HERE / "model.json").read_text())
_MODEL = export.deserialize(bytearray((_HERE / "model.stablehlo").read_bytes()))


def predict(images):
  """(logits, probabilities), float32 [N, H, W, K], of float32 [N, H, W, C] pixel values."""
  logits, probabilities = _MODEL.call(np.asarray(images, np.float32))
  return np.asarray(logits), np.asarray(probabilities)
'''


def inference_function(model, variables: dict, normalization: Normalization, scales: dict | None = None) -> Callable:
  """`images [N, H, W, C]` (pixel values) -> `(logits, probabilities)` of `model` in inference mode.

  Args:
    model: a stock-layer `UNet`.
    variables: its variables (the EMA parameters where a run kept them: `LoadedRun.variables`).
    normalization: the run's rule and statistics (`normalization.of_config` of its data config).
    scales: the run's train-time skip and residual scales (`LoadedRun.state.scales`).
  """
  scales = dict(scales or {})

  def infer(images):
    normalised = normalization(images, jnp)
    logits = model.apply(variables, normalised, train=False, **scales)
    probabilities = jax.nn.sigmoid(logits) if logits.shape[-1] == 1 else jax.nn.softmax(logits, axis=-1)
    return logits, probabilities

  return infer


def _commit() -> str:
  """The project's git commit (with '+dirty' for uncommitted changes), or 'unknown'."""
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, check=True)
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root, capture_output=True, text=True
    )
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head.stdout.strip() + ('+dirty' if dirty.stdout.strip() else '')


def _metrics(loaded, prune_level: int | None = None) -> dict:
  """The run's validation record at the exported step and its test evaluation, where written (of
  the pruned network: evaluate.py --prune_level's; the validation record is the whole network's)."""
  from resunet_jax.training import reporting  # noqa: PLC0415 (training is only needed to export)

  out: dict = {}
  path = loaded.directory / 'metrics.jsonl'
  if path.exists():
    validation = [r for r in reporting.read_metrics(path) if r['split'] == 'validation' and r['step'] <= loaded.step]
    if validation:
      out['validation' if prune_level is None else 'validation_of_the_whole_network'] = validation[-1]
  evaluated = loaded.directory / f'eval_test{"" if prune_level is None else f"_pruned{prune_level}"}.json'
  if evaluated.exists():
    record = json.loads(evaluated.read_text())
    out['test'] = {name: value.get('mean') for name, value in record.get('metrics', {}).items()}
  return out


def card(model_config, fmt: str, *, size: int | str, normalization: Normalization, tile: int, **about) -> dict:
  """A model card: the artefact's contract (`fmt`, input of `size` x `size` or 'any', outputs,
  classes, normalisation) and `about` (preset, training data, metrics, commit, command...).
  A volume network's input is NDHWC, with a `depth` of `size` too."""
  volume = model_config.spatial_dims == 3
  spatial = 'D, H, W' if volume else 'H, W'
  return {
    'card_version': CARD_VERSION,
    'format': fmt,
    'file': FILES[fmt],
    **({'opset': OPSET} if fmt == 'onnx' else {}),
    'input': {
      'name': 'images',
      'dtype': 'float32',
      'layout': 'NDHWC' if volume else 'NHWC',
      'batch': 'any',
      **({'depth': size} if volume else {}),
      'height': size,
      'width': size,
      'channels': normalization.channels,
      'range': [0, 255] if normalization.kind == 'fixed' else 'pixel values as in the training files',
      'normalisation': f'inside: {normalization.describe()["formula"]} (see normalisation)',
    },
    'outputs': {
      'logits': f'float32 [N, {spatial}, K]',
      'probabilities': f'float32 [N, {spatial}, K]: ' + ('sigmoid' if model_config.num_classes == 1 else 'softmax'),
    },
    'model': model_config.to_dict(),
    'classes': max(2, model_config.num_classes),
    'class_rule': 'logit > 0' if model_config.num_classes == 1 else 'argmax',
    'normalisation': normalization.describe(),
    'tile': int(tile),
    **about,
    'exported': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  }


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise UserError(f'--format={fmt} is not supported; use one of {", ".join(FORMATS)}')


def _write(directory: pathlib.Path, name: str, payload: bytes | str) -> None:
  path = directory / name
  temporary = path.with_suffix(path.suffix + '.tmp')
  if isinstance(payload, bytes):
    temporary.write_bytes(payload)
  else:
    temporary.write_text(payload)
  temporary.replace(path)


def export_model(
  model,
  variables: dict,
  output: str | pathlib.Path,
  *,
  fmt: str,
  normalization: Normalization,
  tile: int,
  scales=None,
  **about,
) -> pathlib.Path:
  """Exports `model` (stock layers) with `variables` as an artefact in `output`.

  Args:
    model: a `UNet`.
    variables: its variables.
    output: the artefact folder (created).
    fmt: 'stablehlo' (any size) or 'onnx' (fixed at `tile`).
    normalization: the run's normalisation (rule and statistics), applied inside.
    tile: the training image size (ONNX: the fixed size).
    scales: train-time skip and residual scales (`LoadedRun.state.scales`).
    about: further model card fields (`card`).

  Returns:
    The model file's path.
  """
  _check_format(fmt)
  infer = inference_function(model, variables, normalization, scales)
  output = pathlib.Path(output)
  try:
    output.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create --output={output}: {e.strerror}') from None
  if fmt == 'stablehlo':
    _need_flatbuffers()
    exported = _to_stablehlo(infer, normalization.channels, model.config.spatial_dims)
    _write(output, FILES[fmt], bytes(exported.serialize()))
    _write(output, 'load.py', LOADER)
    size, about = 'any', {'platforms': list(exported.platforms), **about}
  else:
    size = int(tile)
    _write(output, FILES[fmt], _to_onnx(infer, size, normalization.channels, model.config.spatial_dims))
  info = card(model.config, fmt, size=size, normalization=normalization, tile=tile, **about)
  _write(output, CARD, json.dumps(info, indent=1) + '\n')
  return output / FILES[fmt]


def export_run(
  workdir: str | pathlib.Path,
  output: str | pathlib.Path,
  *,
  fmt: str = 'stablehlo',
  checkpoint: str = 'best',
  member: int = 0,
  tile: int | None = None,
  prune_level: int | None = None,
  command: str = '',
) -> pathlib.Path:
  """Exports a trained run (any backend's: restored into the stock layers) into `output`.

  Args:
    workdir: the run's folder (experiments/train.py's --workdir).
    output: the artefact folder (created).
    fmt: 'stablehlo' or 'onnx'.
    checkpoint: 'best', 'latest' or a step.
    member: the population member.
    tile: ONNX only: the fixed side of every spatial axis (default predict.py's: data.patch_size,
      else data.image_size).
    prune_level: a deeply supervised UNet++: export its sub-network of this depth (the card's
      model is that network).
    command: the command line, for the model card.

  Returns:
    The model file's path.

  Raises:
    UserError: an unknown format, a bad workdir or checkpoint, a missing ONNX tool.
  """
  _check_format(fmt)
  from resunet_jax.training import restore  # noqa: PLC0415 (the loader side needs no training code)

  loaded = restore.load_run(workdir, checkpoint, 'stock', member, prune_level)
  data = loaded.config.data
  return export_model(
    loaded.model,
    loaded.variables,
    output,
    fmt=fmt,
    normalization=normalization_lib.of_config(data, data.channels, loaded.model.config.spatial_dims),
    tile=int(tile or data.get('patch_size') or data.image_size),  # predict.py's default tile
    scales=loaded.state.scales,
    preset=loaded.config.get('preset'),
    label_map=data.get('label_map'),
    training_data={'name': data.name, 'image_size': data.image_size, 'backend': loaded.config.runtime.backend},
    checkpoint_step=int(loaded.step),
    run=str(loaded.directory),
    metrics=_metrics(loaded, prune_level),
    commit=_commit(),
    command=command,
  )


def _need_flatbuffers() -> None:
  """jax.export (de)serialises through flatbuffers, which only the [export] extra installs."""
  try:
    import flatbuffers  # noqa: F401, PLC0415
  except ImportError:
    raise UserError("StableHLO artefacts need flatbuffers (the export extra): pip install -e '.[export]'") from None


def _to_stablehlo(infer: Callable, channels: int, spatial_dims: int = 2) -> jax.export.Exported:
  """`infer` exported for a symbolic batch and spatial sizes (height and width; and depth for a
  volume network), lowered for every platform of `PLATFORMS` that this jaxlib can lower for (CPU always)."""
  sizes = jax.export.symbolic_shape('b, h, w' if spatial_dims == 2 else 'b, d, h, w')
  shape = jax.ShapeDtypeStruct((*sizes, channels), jnp.float32)
  for count in range(len(PLATFORMS), 1, -1):
    try:
      return jax.export.export(jax.jit(infer), platforms=PLATFORMS[:count])(shape)
    except Exception:  # noqa: BLE001, S112 (a jaxlib without a platform's lowering: try fewer platforms)
      continue
  return jax.export.export(jax.jit(infer), platforms=PLATFORMS[:1])(shape)


def _to_onnx(infer: Callable, size: int, channels: int, spatial_dims: int = 2) -> bytes:
  """The ONNX model of `infer` at a fixed `size` on every spatial axis, dynamic batch, checked
  with `onnx.checker`."""
  try:
    import onnx  # noqa: PLC0415 (the optional [export] extra)
    from jax2onnx import to_onnx  # noqa: PLC0415
  except ImportError as e:
    raise UserError(f"ONNX export needs the export extra ({e.name} is missing): pip install -e '.[export]'") from None
  logging.getLogger('onnx_ir.serde').setLevel(logging.ERROR)  # "value type ... not known" for shape constants
  model = to_onnx(
    infer,
    [('N', *(size,) * spatial_dims, channels)],
    opset=OPSET,
    model_name='resunet_jax',
    input_names=['images'],
    output_names=['logits', 'probabilities'],
  )
  onnx.checker.check_model(model)
  return model.SerializeToString()


@dataclasses.dataclass
class Exported:
  """An artefact read back: its model card and its logits.

  Attributes:
    card: model.json's content.
    directory: the artefact folder.
  """

  card: dict
  directory: pathlib.Path
  _logits: Callable[[jax.Array], jax.Array]  # traceable: usable inside jax.jit

  @property
  def spatial_dims(self) -> int:
    """2 (images `[N, H, W, C]`) or 3 (volumes `[N, D, H, W, C]`)."""
    return int(self.card.get('model', {}).get('spatial_dims', 2))

  @property
  def tile(self) -> int | None:
    """The fixed height and width of the artefact, or None for any size."""
    height = self.card['input']['height']
    return None if height == 'any' else int(height)

  @property
  def normalization(self) -> Normalization:
    """The normalisation the artefact applies inside (a version-1 card: 'fixed', its mean and std)."""
    channels = int(self.card['input']['channels'])
    rule = self.card.get('normalisation')
    try:
      if not isinstance(rule, dict):
        return normalization_lib.fixed(self.card['mean'], self.card['std'], channels)
      if rule['kind'] == 'fixed':
        return normalization_lib.fixed(rule['mean'], rule['std'], channels, self.spatial_dims)
      return normalization_lib.from_stats(rule['kind'], channels, rule, self.spatial_dims)
    except (DataError, KeyError, TypeError) as e:
      raise UserError(
        f'{self.directory / CARD}: its normalisation cannot be read ({e}); export the run again'
      ) from None

  def logits(self, images: jax.Array) -> jax.Array:
    """Logits `[N, H, W, K]` of float32 images `[N, H, W, C]` (pixel values); traceable (jit, the
    sliding window), an ONNX model through `jax.pure_callback` into onnxruntime."""
    expected, dims = self.card['input'], self.spatial_dims
    if images.ndim != dims + 2 or images.shape[-1] != expected['channels']:
      layout = 'N, H, W' if dims == 2 else 'N, D, H, W'
      raise UserError(
        f'{self.directory}: the model takes [{layout}, {expected["channels"]}] inputs, got {images.shape}'
      )
    if self.tile is not None and tuple(images.shape[1:-1]) != (self.tile,) * dims:
      side = 'x'.join([str(self.tile)] * dims)
      raise UserError(f'{self.directory}: the model takes {side} inputs (fixed), got {tuple(images.shape[1:-1])}')
    return self._logits(images)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """`logits` on numpy images, numpy out."""
    return np.asarray(self.logits(jnp.asarray(images, jnp.float32)))


def load(directory: str | pathlib.Path) -> Exported:
  """Reads the artefact in `directory` (`export_run`'s output).

  Raises:
    UserError: no such folder, no or unreadable model.json, a card that does not match the
      files, an unsupported format, or a model file that cannot be read.
  """
  directory = pathlib.Path(directory)
  path = directory / CARD
  if not directory.is_dir():
    raise UserError(f'--exported={directory} is not a folder; pass the --output of experiments/export.py')
  try:
    info = json.loads(path.read_text())
  except FileNotFoundError:
    raise UserError(
      f'{path} is missing: {directory} is not an exported model (experiments/export.py writes it)'
    ) from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e.msg}, line {e.lineno}); export the run again') from None
  fmt = info.get('format') if isinstance(info, dict) else None
  if fmt not in FORMATS:
    raise UserError(f'{path}: format {fmt!r} is not supported ({", ".join(FORMATS)}); export the run again')
  needed = {'file', 'input', 'classes', *(('mean', 'std') if info.get('card_version', 1) == 1 else ('normalisation',))}
  if missing := sorted(needed - set(info)):
    raise UserError(f'{path} lacks {", ".join(missing)}: it does not describe an exported model; export the run again')
  model_path = directory / info['file']
  if info['file'] != FILES[fmt] or not model_path.is_file():
    raise UserError(f'{path} names {info["file"]!r}, but {directory} holds no {FILES[fmt]}; export the run again')
  if fmt == 'stablehlo':
    _need_flatbuffers()
    try:
      exported = jax.export.deserialize(bytearray(model_path.read_bytes()))
    except Exception as e:  # noqa: BLE001 (flatbuffers raises many kinds on a corrupt file)
      raise UserError(
        f'{model_path} cannot be read as a jax.export artefact ({type(e).__name__}); export again'
      ) from None
    (shape,) = [a.shape for a in exported.in_avals]
    if shape[-1] != info['input']['channels']:
      raise UserError(f'{path} says {info["input"]["channels"]} channels, the model takes {shape[-1]}; export again')

    return Exported(info, directory, lambda images: exported.call(images)[0])
  try:
    import onnxruntime  # noqa: PLC0415 (the optional [export] extra)
  except ImportError:
    raise UserError("running an ONNX artefact needs onnxruntime: pip install -e '.[export]'") from None
  try:
    session = onnxruntime.InferenceSession(str(model_path), providers=['CPUExecutionProvider'])
  except Exception as e:  # noqa: BLE001 (onnxruntime raises its own error types)
    raise UserError(f'{model_path} cannot be loaded by onnxruntime ({type(e).__name__}); export again') from None
  (tensor,) = session.get_inputs()
  sides = [info['input'][axis] for axis in ('depth', 'height', 'width') if axis in info['input']]
  if tensor.shape[1:] != [*sides, info['input']['channels']]:
    raise UserError(f'{path} says input {info["input"]}, the ONNX model takes {tensor.shape}; export again')

  outputs = int(info['model']['num_classes']) if isinstance(info.get('model'), dict) else 1

  def run(images):
    return session.run(['logits'], {tensor.name: np.asarray(images, np.float32)})[0]

  def logits(images):
    shape = jax.ShapeDtypeStruct((*images.shape[:-1], outputs), jnp.float32)
    return jax.pure_callback(run, shape, images, vmap_method='sequential')

  return Exported(info, directory, logits)


def command_line() -> str:
  """This process's command line, for the model card."""
  return ' '.join([pathlib.Path(sys.executable).name, *sys.argv])
