r"""The full training loop against its own bare step, in one process.

  python benchmarks/train_loop.py                        # the quickstart: ResUNet base 16, batch 8
  python benchmarks/train_loop.py --model=unet --steps=300 --config.model.base_width=64

Runs `train_and_evaluate` on `--config` (default: the quickstart's, `experiments/configs/
default.py`) for `--steps` steps in a temporary workdir, with everything the loop does: the
Grain input pipeline, logging every `train.log_every` steps, checkpoints every
`train.checkpoint_every` and at the end. Its throughput is the median of the logged
`images_per_sec` intervals after the first (which holds the compile); the loop already leaves
validation time out. Then it times the loop's own compiled step (`parallel.compile_steps`: the
same loss, optimizer and in-step metrics) bare, on one device-resident batch: `--bare_steps`
steps back to back (a rate over their total time, like the loop's intervals), then the median
of as many steps timed one by one. Prints one JSON line with both and `loop_over_bare`.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
from absl import flags

from resunet_jax import cli, data, models
from resunet_jax.training import loop, parallel, reporting

_MODEL = flags.DEFINE_string('model', 'resunet', f'Model preset: {", ".join(models.PRESETS)}.')
_CONFIG = cli.define_config_file('config', 'experiments/configs/default.py', 'Experiment config file.')
_STEPS = flags.DEFINE_integer('steps', 200, 'Loop steps (the first logged interval, with the compile, is left out).')
_BARE_STEPS = flags.DEFINE_integer('bare_steps', 30, 'Bare steps timed, twice (after 3 warm-up steps).')


def loop_rate(config) -> tuple[float, list[float]]:
  """The loop's median logged images/s (after the first interval) and every interval's."""
  with tempfile.TemporaryDirectory() as workdir:
    loop.train_and_evaluate(config, workdir, verbose=False)
    rows = reporting.read_metrics(pathlib.Path(workdir) / 'metrics.jsonl')
  rates = [row['images_per_sec'] for row in rows if row['split'] == 'train']
  return statistics.median(rates[1:]), rates


def check_intervals(train) -> None:
  """Before training: the loop must log at least 3 intervals (the first, with the compile, is left out)."""
  count = len(loop.logged_steps(train))
  if count < 3:
    raise cli.UserError(
      f'--steps={train.num_steps} gives {count} logged interval(s) with train.log_every={train.log_every}; '
      'give --steps for at least 3'
    )


def bare_rate(config, model_config, info) -> tuple[float, float]:
  """Images/s and median ms of the loop's compiled step alone, on one device-resident batch.

  The rate is over the whole run of `--bare_steps` steps dispatched back to back, as the loop
  dispatches them (a mean, like the loop's intervals); the median is of the same steps timed
  one at a time, waiting for each.
  """
  mesh = parallel.make_mesh()
  single = loop.build_population(config, model_config, info, mesh)  # a population of one: its member's step
  state, train_fn = single.states[0], single.train_fn
  pipeline = data.make_pipeline(config.data, 'train', batch_size=config.train.batch_size, seed=config.seed, train=True)
  batch = data.to_global(next(iter(pipeline)), parallel.batch_sharding(mesh))
  for _ in range(3):
    state, step_metrics = train_fn(state, batch)
  jax.block_until_ready((state, step_metrics))
  start = time.perf_counter()
  for _ in range(_BARE_STEPS.value):
    state, step_metrics = train_fn(state, batch)
  jax.block_until_ready((state, step_metrics))
  rate = _BARE_STEPS.value * config.train.batch_size / (time.perf_counter() - start)
  times = []
  for _ in range(_BARE_STEPS.value):
    start = time.perf_counter()
    state, step_metrics = train_fn(state, batch)
    jax.block_until_ready((state, step_metrics))
    times.append(time.perf_counter() - start)
  return rate, statistics.median(times) * 1000


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --model=resunet')
  config = _CONFIG.value
  config.preset = _MODEL.value
  config.train.num_steps = _STEPS.value
  config.train.eval_every = _STEPS.value  # one validation, at the end (not counted as training time)
  check_intervals(config.train)
  model_config, info, _ = loop.resolve(config)
  loop_images_per_sec, intervals = loop_rate(config)
  bare_images_per_sec, bare_ms = bare_rate(config, model_config, info)
  result = {
    'benchmark': 'train_loop',
    'model': config.preset,
    'base_width': model_config.base_width,
    'batch': config.train.batch_size,
    'steps': config.train.num_steps,
    'log_every': config.train.log_every,
    'checkpoint_every': config.train.checkpoint_every,
    'loop_images_per_sec': round(loop_images_per_sec, 2),
    'loop_intervals_images_per_sec': [round(rate, 1) for rate in intervals],
    'bare_images_per_sec': round(bare_images_per_sec, 2),
    'bare_step_ms_median': round(bare_ms, 1),
    'loop_over_bare': round(loop_images_per_sec / bare_images_per_sec, 3),
    'backend': config.runtime.backend,
    'cpu_count': os.cpu_count(),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  cli.run(main)
