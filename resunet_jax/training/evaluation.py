"""Evaluation of a split: per-image metrics, their summary, and a markdown report.

`data.evaluation` picks how an image is scored: 'resize' (the default) as the evaluation pipeline
yields it, resized to `data.image_size`; 'whole' at its own size, every pixel, through the
Gaussian sliding window of `resunet_jax.inference` (tiles of `data.patch_size`, else
`data.image_size`; device memory bounded by the tile batch). Every metric
is computed per image and then averaged over images (classes averaged within an image; the
foreground only for binary models). Empty-mask conventions are those of `metrics`: Dice, IoU
and boundary F1 are 1 when prediction and truth are both empty and 0 when exactly one is;
HD95 is 0 and the image diagonal respectively. Volumes (always 'whole') are scored with their
voxel spacing: HD95 in its units, and `surface_dice` (`VOLUME_METRICS`) at the boundary tolerance
in the same units (1 for two empty masks, 0 for one).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from resunet_jax import data, inference, metrics
from resunet_jax.errors import DataError
from resunet_jax.training import parallel, reporting

METRICS = ('dice', 'iou', 'accuracy', 'boundary_f1', 'hd95')
VOLUME_METRICS = (*METRICS, 'surface_dice')
MODES = ('resize', 'whole')
OVERLAP = 0.5  # of a tile's side, between neighbouring tiles of whole-image evaluation


def _local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in its local batch order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _encode(ids: list[str], width: int = 64) -> np.ndarray:
  """Ids as `[N, width]` uint8 rows of UTF-8 (truncated), for gathering across processes."""
  rows = np.zeros((len(ids), width), np.uint8)
  for row, text in zip(rows, ids, strict=True):
    encoded = text.encode()[:width]
    row[: len(encoded)] = np.frombuffer(encoded, np.uint8)
  return rows


def map_split(
  fn, state, data_config, mesh, *, role: str, batch_size: int, args: tuple = ()
) -> Iterator[tuple[dict, dict]]:
  """One pass over a split: yields each host batch and this process's rows of `fn`'s outputs.

  Args:
    fn: a function compiled with `parallel.compile_eval`: `fn(state, global batch, *args)`
      returning a dict of arrays whose leading axis is the batch.
    state: the train state.
    data_config: the experiment's `data` section.
    mesh: the device mesh.
    role: 'validation' | 'test' | 'train' (or a raw split string).
    batch_size: the global batch (`train.batch_size`), split over the processes.
    args: further (replicated) arguments of `fn`.

  Yields:
    `(batch, rows)`: the process-local batch (`image`, `mask`, `valid`, `id`) and `fn`'s
    outputs as numpy, the rows of that batch in its order. Padding rows have `valid = 0`.
  """
  per_process = max(batch_size // jax.process_count(), 1)
  pipeline = data.make_pipeline(data_config, role, batch_size=per_process, seed=0, train=False)
  sharding = parallel.batch_sharding(mesh)
  for batch in pipeline:
    out = fn(state, data.to_global(batch, sharding), *args)
    yield batch, {key: _local_rows(value) for key, value in out.items()}


def gather_rows(local: dict[str, np.ndarray], ids: list[str]) -> dict[str, np.ndarray]:
  """Per-example rows of every process, padding dropped: `local` must hold `valid` `[N]`.

  Returns:
    Every entry of `local` but `valid`, over the whole split, and `id` `[N]` str.
  """
  if jax.process_count() > 1:  # Every process holds the same number of (padded) rows.
    local = {name: np.concatenate(list(multihost_utils.process_allgather(v))) for name, v in local.items()}
    gathered = multihost_utils.process_allgather(_encode(ids))  # strings are not JAX types
    ids = [bytes(row).rstrip(b'\0').decode('utf-8', 'replace') for part in gathered for row in part]
  valid = local.pop('valid') > 0
  rows = {name: values[valid] for name, values in local.items()}
  rows['id'] = np.asarray(ids)[valid]
  return rows


def evaluate_split(
  eval_fn,
  state,
  data_config,
  mesh,
  *,
  batch_size: int,
  boundary_tolerance: float,
  role: str = 'validation',
  keep: int = 0,
) -> tuple[dict, dict]:
  """Per-image metrics of `state` on a split, over all processes.

  Args:
    eval_fn: the compiled `steps.eval_step` (from `parallel.compile_steps`).
    state: the train state.
    data_config: the experiment's `data` section.
    mesh: the device mesh.
    batch_size: the global batch (`train.batch_size`).
    boundary_tolerance: boundary F1's tolerance in pixels (`train.boundary_tolerance`).
    role: 'validation' | 'test' | 'train' (or a raw split string).
    keep: sample images (of process 0's first examples) to return for figures.

  Returns:
    `per_image`: `{'id': [N] str, metric: [N] for METRICS, 'class_dice': [N, K]}` over the
    whole split; `samples`: `{'image' uint8, 'mask', 'prediction'}` of up to `keep` images.
  """
  mode = data_config.get('evaluation') or 'resize'
  if mode not in MODES:
    raise DataError(f"data.evaluation='{mode}' is not one of {', '.join(MODES)}")
  if mode == 'whole':
    return evaluate_whole(
      state, data_config, batch_size=batch_size, boundary_tolerance=boundary_tolerance, role=role, keep=keep
    )
  rows: dict[str, list] = {name: [] for name in (*METRICS, 'class_dice', 'valid')}
  ids: list[str] = []
  samples = {'image': [], 'mask': [], 'prediction': []}
  norm = data.resolve_normalization(data_config, spatial_dims=2) if keep else None
  for batch, out in map_split(eval_fn, state, data_config, mesh, role=role, batch_size=batch_size):
    for name, value in _image_rows(out, out['predictions'], batch['mask'], boundary_tolerance).items():
      rows[name].append(value)
    rows['valid'].append(batch['valid'])
    ids.extend(str(i) for i in batch['id'])
    valid = batch['valid'] > 0
    if len(samples['image']) < keep and valid.any():
      take = min(keep - len(samples['image']), int(valid.sum()))
      pixels = norm.unnormalise(batch['image'][valid][:take])
      if norm.kind == 'fixed':
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
      samples['image'].extend(reporting.viewable(image) for image in pixels)
      samples['mask'].extend(batch['mask'][valid][:take])
      samples['prediction'].extend(out['predictions'][valid][:take])
  per_image = gather_rows({name: np.concatenate(values) for name, values in rows.items()}, ids)
  return per_image, {key: np.asarray(value) for key, value in samples.items()}


def _image_rows(
  counts: dict, predictions: np.ndarray, masks: np.ndarray, tolerance: float, spacing=None
) -> dict[str, np.ndarray]:
  """Each image's `METRICS` and `class_dice` (`[B]`, `[B, K]`) from its confusion counts (`metrics.confusion`,
  numpy) and its predictions and masks `[B, *spatial]` (boundary F1 at `tolerance` px, HD95); with
  `spacing` `[B, 3]` (volumes) HD95 in its units and `surface_dice` at `tolerance` in them too."""
  per_class = metrics.class_scores(counts)
  edges = metrics.boundary_scores(predictions, masks, counts['tp'].shape[-1], tolerance, spacing)
  return {
    'class_dice': per_class['dice'],
    'dice': per_class['dice'].mean(-1),
    'iou': per_class['iou'].mean(-1),
    'accuracy': counts['correct'],
    **edges,
  }


@functools.cache
def _tile_apply(apply_fn):
  """`(variables and scales, tiles) -> logits` of a model's `apply`, one object per model, so the
  sliding window compiles once per model."""

  def run(inputs, tiles):
    variables, scales = inputs
    return apply_fn(variables, tiles, train=False, **scales)

  return run


def score_image(
  apply,
  inputs,
  image: np.ndarray,
  mask: np.ndarray,
  *,
  tile: int,
  batch_size: int,
  boundary_tolerance: float,
  spacing=None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """One whole image's (or volume's) metrics, every pixel scored.

  Args:
    apply: `(inputs, tiles [N, *tile, C]) -> logits` (`_tile_apply` of a model).
    inputs: what `apply` takes first (variables and scales).
    image: `[H, W, C]` (a volume `[D, H, W, C]`) float32 model inputs (normalised).
    mask: `[H, W]` (`[D, H, W]`) int class ids.
    tile, batch_size: the sliding window's tile side and tiles per call.
    boundary_tolerance: boundary F1's tolerance in pixels (surface Dice's in spacing units).
    spacing: a volume's voxel size `[3]`: HD95 in its units, and surface Dice.

  Returns:
    The image's row of every `METRICS` (volumes: `VOLUME_METRICS`) entry and `class_dice`
    (`[1]` and `[1, K]` arrays), and its predictions `[H, W]` (`[D, H, W]`) int32.
  """
  logits = inference.sliding_window(apply, inputs, image, tile=tile, overlap=OVERLAP, batch_size=batch_size)
  outputs = logits.shape[-1]
  predictions = np.asarray(metrics.predict(logits[None]))
  del logits  # the largest array: gone before the scores' own
  counts = metrics.confusion(predictions, mask[None], outputs)
  spacing = None if spacing is None else np.asarray(spacing)[None]
  return _image_rows(counts, predictions, mask[None], boundary_tolerance, spacing), predictions[0]


def evaluate_whole(
  state, data_config, *, batch_size: int, boundary_tolerance: float, role: str = 'validation', keep: int = 0
) -> tuple[dict, dict]:
  """`evaluate_split` with every image scored at its own size (`data.evaluation='whole'`).

  Each image is normalised whole (the run's rule), predicted by `inference.sliding_window` with
  Gaussian blending (`OVERLAP`; `batch_size` tiles per call) and scored on all its pixels.
  Images are split over the processes as in evaluation pipelines. Sample images for figures
  are the top-left `tile` x `tile` corner of the first `keep` (of a volume: of its middle slice).
  """
  source = data.open_split(data_config, role)
  count, index = jax.process_count(), jax.process_index()
  per_process = -(-len(source) // count)
  indices, valid = data.shard(len(source), index, count, pad_to=per_process)
  norm = data.resolve_normalization(data_config, spatial_dims=source.spatial_dims)
  tile = int(data_config.get('patch_size') or data_config.image_size)
  apply = _tile_apply(state.apply_fn)
  inputs = (state.variables(state.eval_params), state.scales)
  names = VOLUME_METRICS if source.spatial_dims == 3 else METRICS
  rows: dict[str, list] = {name: [] for name in (*names, 'class_dice', 'valid')}
  ids: list[str] = []
  samples = {'image': [], 'mask': [], 'prediction': []}
  for i, ok in zip(indices, valid, strict=True):
    record = source[int(i)]
    image, mask = record['image'], np.asarray(record['mask'], np.int32)
    if mask.shape != image.shape[:-1]:
      raise DataError(
        f'{record["id"]}: mask {mask.shape} and image {image.shape[:-1]} differ; whole-image evaluation scores '
        "the image's own pixels: give masks of the images' size, or data.evaluation='resize'"
      )
    row, predictions = score_image(
      apply,
      inputs,
      norm(image),
      mask,
      tile=tile,
      batch_size=batch_size,
      boundary_tolerance=boundary_tolerance,
      spacing=record.get('spacing'),
    )
    for name, value in (*row.items(), ('valid', np.asarray([ok], np.float32))):
      rows[name].append(value)
    ids.append(str(record['id']))
    if ok and len(samples['image']) < keep:
      if mask.ndim == 3:  # a volume's figure: its middle slice
        middle = mask.shape[0] // 2
        image, mask, predictions = image[middle], mask[middle], predictions[middle]
      corner = np.s_[: min(tile, mask.shape[0]), : min(tile, mask.shape[1])]
      pixels = image[corner]
      samples['image'].append(reporting.viewable(pixels))
      samples['mask'].append(mask[corner])
      samples['prediction'].append(predictions[corner])
  per_image = gather_rows({name: np.concatenate(values) for name, values in rows.items()}, ids)
  side = min((m.shape for m in samples['mask']), default=(0, 0))
  crop = np.s_[: side[0], : side[1]]
  return per_image, {key: np.asarray([v[crop] for v in value]) for key, value in samples.items()}


def summarize(per_image: dict) -> dict:
  """Means over images of every metric, and the image count."""
  names = [name for name in VOLUME_METRICS if name in per_image]
  result = {name: float(np.mean(per_image[name])) if len(per_image[name]) else float('nan') for name in names}
  result['images'] = len(per_image['dice'])
  return result


def report(per_image: dict, *, tolerance: float) -> dict:
  """The full evaluation record: per metric mean, median, 5th and 95th percentile; per class."""
  record = {'images': len(per_image['dice']), 'boundary_tolerance_px': tolerance, 'metrics': {}}
  for name in (name for name in VOLUME_METRICS if name in per_image):
    values = per_image[name]
    record['metrics'][name] = {
      'mean': float(np.mean(values)),
      'median': float(np.median(values)),
      'p5': float(np.percentile(values, 5)),
      'p95': float(np.percentile(values, 95)),
    }
  record['class_dice'] = [float(v) for v in per_image['class_dice'].mean(0)]
  return record


def markdown(record: dict, title: str) -> str:
  """A markdown table of a `report` record."""
  tolerance = record['boundary_tolerance_px']
  units = (
    f'{record["images"]} volumes; boundary F1 at {tolerance:g} voxels; surface Dice at {tolerance:g} and HD95 in '
    'the units of the voxel spacing (lower is better)'
    if 'surface_dice' in record['metrics']
    else f'{record["images"]} images; boundary F1 at {tolerance:g} px tolerance; HD95 in pixels (lower is better)'
  )
  lines = [
    f'# {title}',
    '',
    f'{units}. Means of per-image values.',
    '',
    '| metric | mean | median | 5th pct | 95th pct |',
    '|---|---|---|---|---|',
  ]
  for name, values in record['metrics'].items():
    lines.append(
      f'| {name} | {values["mean"]:.4f} | {values["median"]:.4f} | {values["p5"]:.4f} | {values["p95"]:.4f} |'
    )
  if len(record['class_dice']) > 1:
    lines += ['', '| class | Dice |', '|---|---|']
    lines += [f'| {index} | {value:.4f} |' for index, value in enumerate(record['class_dice'])]
  return '\n'.join(lines) + '\n'
