"""Evaluation of a split: per-image metrics, their summary, and a markdown report.

Images are evaluated as the pipeline yields them (resized to `data.image_size`). Every metric
is computed per image and then averaged over images (classes averaged within an image; the
foreground only for binary models). Empty-mask conventions are those of `metrics`: Dice, IoU
and boundary F1 are 1 when prediction and truth are both empty and 0 when exactly one is;
HD95 is 0 and the image diagonal respectively.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from resunet_jax import data, metrics
from resunet_jax.training import parallel, reporting

METRICS = ('dice', 'iou', 'accuracy', 'boundary_f1', 'hd95')


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
  rows: dict[str, list] = {name: [] for name in (*METRICS, 'class_dice', 'valid')}
  ids: list[str] = []
  samples = {'image': [], 'mask': [], 'prediction': []}
  norm = data.resolve_normalization(data_config) if keep else None
  for batch, out in map_split(eval_fn, state, data_config, mesh, role=role, batch_size=batch_size):
    per_class = metrics.class_scores(out)
    outputs = out['tp'].shape[-1]
    edges = metrics.boundary_scores(out['predictions'], batch['mask'], outputs, boundary_tolerance)
    rows['class_dice'].append(per_class['dice'])
    rows['dice'].append(per_class['dice'].mean(-1))
    rows['iou'].append(per_class['iou'].mean(-1))
    rows['accuracy'].append(out['correct'])
    rows['boundary_f1'].append(edges['boundary_f1'])
    rows['hd95'].append(edges['hd95'])
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


def summarize(per_image: dict) -> dict:
  """Means over images of every metric, and the image count."""
  result = {name: float(np.mean(per_image[name])) if len(per_image[name]) else float('nan') for name in METRICS}
  result['images'] = len(per_image['dice'])
  return result


def report(per_image: dict, *, tolerance: float) -> dict:
  """The full evaluation record: per metric mean, median, 5th and 95th percentile; per class."""
  record = {'images': len(per_image['dice']), 'boundary_tolerance_px': tolerance, 'metrics': {}}
  for name in METRICS:
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
  lines = [
    f'# {title}',
    '',
    f'{record["images"]} images; boundary F1 at {record["boundary_tolerance_px"]:g} px tolerance; '
    'HD95 in pixels (lower is better). Means of per-image values.',
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
