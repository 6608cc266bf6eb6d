r"""Input pipeline throughput, optionally against a training step's consumption rate.

  python benchmarks/input_pipeline.py [--batch=16] [--batches=60] [--threads=4] [--workers=0]
  python benchmarks/input_pipeline.py --step --model=resunet --base_width=16

Prints one JSON line. `images_per_sec` is the default training pipeline (crop/scale, flips,
rot90, colour, normalise, batch) on `--data`, after the first batch; with `--step`, also a
jitted step (forward, sigmoid BCE, backward, Adam) on batches of the same shape, its median
over `--steps`, and `pipeline_over_step`, how many times faster the input is than the step.
"""

import json
import os
import sys
import time

from absl import app, flags

from resunet_jax import data

_DATA = flags.DEFINE_string('data', 'synthetic_roads', 'Dataset name.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_BATCHES = flags.DEFINE_integer('batches', 60, 'Batches timed after the first.')
_THREADS = flags.DEFINE_integer('threads', 4, 'Grain read threads.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Grain worker processes.')
_ELASTIC = flags.DEFINE_float('elastic_prob', 0.0, 'Probability of elastic deformation.')
_STEP = flags.DEFINE_bool('step', False, 'Also time a training step on the same batch shape.')
_MODEL = flags.DEFINE_string('model', 'resunet', 'Preset for --step.')
_WIDTH = flags.DEFINE_integer('base_width', 16, 'Base width for --step.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps for --step (after 2 warm-up steps).')


def pipeline_rate(config) -> tuple[float, float]:
  start = time.perf_counter()
  iterator = iter(data.make_pipeline(config, 'train', batch_size=_BATCH.value, seed=0, train=True))
  next(iterator)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  return _BATCHES.value * _BATCH.value / (time.perf_counter() - start), first


def step_rate(size: int) -> tuple[float, float]:
  """Images/s and median ms of the training step of `benchmarks/train_step.py` at this batch shape."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_step

  args = train_step.parse_args(
    [
      f'--model={_MODEL.value}',
      f'--base-width={_WIDTH.value}',
      f'--batch={_BATCH.value}',
      f'--size={size}',
      f'--steps={_STEPS.value}',
      '--warmup=2',
    ]
  )
  figures, _ = train_step.jax_step(args)
  return figures['images_per_sec'], figures['step_ms_median']


def main(argv):
  del argv
  config = data.default_config()
  config.name, config.read_threads, config.num_workers = _DATA.value, _THREADS.value, _WORKERS.value
  config.augment.elastic_prob = _ELASTIC.value
  data.sources.prepare_embedded(config.name, data.sources.data_dir(config))
  rate, first = pipeline_rate(config)
  result = {
    'benchmark': 'input_pipeline',
    'data': config.name,
    'batch': _BATCH.value,
    'read_threads': _THREADS.value,
    'num_workers': _WORKERS.value,
    'elastic_prob': _ELASTIC.value,
    'images_per_sec': round(rate, 1),
    'first_batch_s': round(first, 2),
    'cpu_count': os.cpu_count(),
  }
  if _STEP.value:
    step_images_per_sec, step_ms = step_rate(config.image_size)
    result.update(
      step_model=f'{_MODEL.value} base {_WIDTH.value}',
      step_images_per_sec=round(step_images_per_sec, 1),
      step_ms_median=round(step_ms, 1),
      pipeline_over_step=round(rate / step_images_per_sec, 1),
    )
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
