r"""K members in one population against the same K runs one after another.

  python benchmarks/population.py                       # K = 1, 4, 8, 16; 50 steps each
  python benchmarks/population.py --k=8 --steps=300     # one ablation run's budget

The network is the ablation grid's ResUNet (`resunet_jax.ablation.grid.cpu_config`: 64x64,
base width 8, depth 4, batch 16). Each arm is its own process, so start-up, initialisation and
compilation count as they do for a user: `population` trains K members (seeds 0..K-1) with the
training loop's `Population` (`runtime.members`: 'auto' unless `--members`), and `separate` runs
K processes one after another, each training one member. Every process times its steps on
fixed random batches placed on the device once (the input pipeline is benchmarked by
`input_pipeline.py`) and reports its peak memory: the host's peak resident set (VmHWM) and, on
an accelerator, the device's peak bytes in use. Prints one JSON line per K: both arms' wall
seconds (process start to last step), where it went (start-up and imports, initialisation and
compilation, the steps), images per second over the wall, peak memory, and
`population_over_separate`, the ratio of the two throughputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

_START = time.perf_counter()

from absl import app, flags  # noqa: E402

_K = flags.DEFINE_list('k', ['1', '4', '8', '16'], 'Population sizes.')
_STEPS = flags.DEFINE_integer('steps', 50, 'Training steps of every member.')
_MEMBERS = flags.DEFINE_enum('members', 'auto', ['auto', 'vmap', 'loop'], 'runtime.members of the population arm.')
_CHILD = flags.DEFINE_integer('child', 0, 'Internal: train this many members in this process and print its figures.')


def _peak_host_bytes() -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM'))


def _child(count: int) -> dict:
  """Trains a population of `count` for `--steps` steps; its phases' seconds and peak memory."""
  import jax
  import numpy as np

  from resunet_jax import models
  from resunet_jax.ablation import grid
  from resunet_jax.training import parallel, population

  imported = time.perf_counter()
  config = grid.cpu_config()
  config.preset = 'resunet'
  config.population.seeds = count
  config.runtime.members = _MEMBERS.value
  model_config = models.preset('resunet', base_width=8, depth=4, num_classes=1)
  mesh = parallel.make_mesh()
  model = models.UNet(model_config)
  members = population.members(config, model_config)
  run = population.Population(config, model, (1, 64, 64, 3), members, mesh)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(16, 64, 64, 3)).astype(np.float32),
    'mask': (rng.random((16, 64, 64)) > 0.8).astype(np.int32),
    'valid': np.ones(16, np.float32),
    'id': np.asarray([str(i) for i in range(16)]),
  }
  batches = [batch] * count  # one object: placed on the device once
  run.train(batches, 16)  # the first step compiles
  jax.block_until_ready(run.stacked())
  built = time.perf_counter()
  for _ in range(_STEPS.value - 1):
    run.train(batches, 16)
  jax.block_until_ready(run.stacked())
  done = time.perf_counter()
  stats = jax.devices()[0].memory_stats() or {}
  return {
    'startup_s': imported - _START,
    'build_and_first_step_s': built - imported,
    'steps_s': done - built,
    'mode': run.mode,
    'peak_host_bytes': _peak_host_bytes(),
    'peak_device_bytes': stats.get('peak_bytes_in_use'),
  }


def _process(count: int) -> dict:
  started = time.perf_counter()
  command = [sys.executable, __file__, f'--child={count}', f'--steps={_STEPS.value}', f'--members={_MEMBERS.value}']
  out = subprocess.run(command, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f'benchmark process failed: {out.stderr.strip().splitlines()[-1:]}')
  figures = json.loads(out.stdout.strip().splitlines()[-1])
  figures['wall_s'] = time.perf_counter() - started
  return figures


def main(argv: list[str]) -> None:
  del argv
  if _CHILD.value:
    print(json.dumps(_child(_CHILD.value)))
    return
  for count in (int(k) for k in _K.value):
    grouped = _process(count)
    separate = [_process(1) for _ in range(count)]
    images = count * _STEPS.value * 16
    wall = sum(s['wall_s'] for s in separate)

    def phases(runs):
      return {key: round(sum(r[key] for r in runs), 2) for key in ('startup_s', 'build_and_first_step_s', 'steps_s')}

    peaks = [s['peak_device_bytes'] for s in separate]
    result = {
      'benchmark': 'population',
      'k': count,
      'steps': _STEPS.value,
      'batch': 16,
      'platform': os.environ.get('JAX_PLATFORMS') or 'default',
      'mode': grouped['mode'],
      'population_wall_s': round(grouped['wall_s'], 2),
      'population_phases': phases([grouped]),
      'population_images_per_sec': round(images / grouped['wall_s'], 2),
      'population_peak_host_bytes': grouped['peak_host_bytes'],
      'population_peak_device_bytes': grouped['peak_device_bytes'],
      'separate_wall_s': round(wall, 2),
      'separate_phases': phases(separate),
      'separate_images_per_sec': round(images / wall, 2),
      'separate_peak_host_bytes': max(s['peak_host_bytes'] for s in separate),
      'separate_peak_device_bytes': None if None in peaks else max(peaks),
      'population_over_separate': round(wall / grouped['wall_s'], 3),
      'cpu_count': os.cpu_count(),
    }
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
