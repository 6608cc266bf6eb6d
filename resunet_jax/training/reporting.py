"""Run outputs: metrics.jsonl, TensorBoard events, and the end-of-run figures."""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys

import matplotlib
from absl import logging

matplotlib.use('Agg')  # Files only: no display on servers and CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402


def progress_bar(*, show: bool, **kwargs) -> tuple[tqdm, bool]:
  """A tqdm bar where stderr is a terminal; elsewhere (a file, a pipe) a disabled one.

  Returns the bar and whether it is live: where it is not, callers print a line per log
  interval (`progress_line`) instead of thousands of carriage-return frames on one line.
  """
  live = show and sys.stderr.isatty()
  return tqdm(disable=not live, **kwargs), live


def progress_line(text: str) -> None:
  """One line of progress on stderr, for a non-terminal (see `progress_bar`)."""
  print(text, file=sys.stderr, flush=True)


class MetricWriter:
  """Appends `{"step", "split", ...}` lines to metrics.jsonl and scalars to TensorBoard.

  Only the process that should write (process 0) opens files; others get a no-op writer.
  """

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = workdir / 'metrics.jsonl'
    self.tensorboard_dir = workdir / 'tensorboard'
    self._board = None
    if enabled:
      from tensorboardX import SummaryWriter

      self._board = SummaryWriter(str(self.tensorboard_dir))

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    values = {key: float(value) for key, value in values.items()}
    with self.jsonl.open('a') as f:
      f.write(json.dumps({'step': step, 'split': split, **values}) + '\n')
    for key, value in values.items():
      self._board.add_scalar(f'{split}/{key}', value, step)
    self._board.flush()

  def close(self) -> None:
    if self._board is None:
      return
    try:
      self._board.close()
    except OSError as e:  # A full or read-only disk: the run's own error says so already.
      logging.warning('TensorBoard events in %s could not be written: %s', self.tensorboard_dir, e)
      # Stop tensorboardX's writer thread and exit hook too, which would fail again, noisily.
      with contextlib.suppress(AttributeError):
        events = self._board.file_writer.event_writer
        events._closed = True
        events._worker.stop()


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of a metrics.jsonl (the last record wins for a repeated step and split).

  A line cut short (the process was killed while appending it) is skipped: a resumed run
  writes that step again.
  """
  records = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    records[(record['split'], record['step'])] = record
  return sorted(records.values(), key=lambda r: (r['split'], r['step']))


def plot_learning_curves(metrics_path: pathlib.Path, out_path: pathlib.Path) -> None:
  """Training loss and Dice, and validation Dice/IoU/boundary F1, against steps."""
  records = read_metrics(metrics_path)
  train = [r for r in records if r['split'] == 'train']
  valid = [r for r in records if r['split'] == 'validation']
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  left.plot([r['step'] for r in train], [r['loss'] for r in train], label='train loss')
  left.set_xlabel('step')
  left.set_yscale('log')
  left.legend()
  right.plot([r['step'] for r in train], [r['dice'] for r in train], label='train Dice', alpha=0.5)
  for key in ('dice', 'iou', 'boundary_f1'):
    right.plot([r['step'] for r in valid], [r[key] for r in valid], marker='o', label=f'validation {key}')
  right.set_xlabel('step')
  right.set_ylim(0, 1)
  right.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


def viewable(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
  """uint8 `[H, W, 3]` to look at, of an image `[H, W, C]` of any bit depth and channel count.

  8-bit grey and RGB(A) images are shown as stored; others as their first three channels (or the
  first alone, grey, when there are fewer than three), each stretched from its `percentiles` to
  0..255, so a 12-bit or a normalised float image is neither black nor saturated.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  shown = image[..., :3] if image.shape[-1] >= 3 else image[..., :1]
  if image.dtype != np.uint8:
    low, high = np.percentile(shown, percentiles, axis=(0, 1))
    span = np.where(high > low, high - low, 1.0)
    shown = (np.clip((shown - low) / span, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  return np.repeat(shown, 3, -1) if shown.shape[-1] == 1 else np.ascontiguousarray(shown)


def overlay(image: np.ndarray, prediction: np.ndarray, colour=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
  """uint8 image with the nonzero prediction tinted."""
  out = image.astype(np.float32)
  where = prediction > 0
  out[where] = (1 - alpha) * out[where] + alpha * np.asarray(colour, np.float32)
  return out.astype(np.uint8)


def plot_predictions(images: np.ndarray, masks: np.ndarray, predictions: np.ndarray, out_path: pathlib.Path) -> None:
  """Rows of image | ground truth | prediction overlay. Images uint8 `[N, H, W, 3]`."""
  rows = len(images)
  fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
  top = max(int(masks.max()), int(predictions.max()), 1)
  for row, (image, mask, prediction) in enumerate(zip(images, masks, predictions, strict=True)):
    panels = (image, mask, overlay(image, prediction))
    for axis, panel, title in zip(axes[row], panels, ('image', 'ground truth', 'prediction'), strict=True):
      axis.imshow(panel, cmap='gray' if panel.ndim == 2 else None, vmin=0, vmax=top if panel.ndim == 2 else None)
      axis.set_axis_off()
      if row == 0:
        axis.set_title(title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=80)
  plt.close(fig)
