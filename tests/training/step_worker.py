"""Runs 3 training steps on fixed global batches; saves the final parameters.

Usage: python step_worker.py OUT.npz STRATEGY DEVICES [PORT PROCESS_ID NUM_PROCESSES]
With a port, joins a local multi-process run (DEVICES per process) and feeds its half of
every global batch; without, one process with DEVICES devices.
"""

import os
import sys

os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={sys.argv[3]}'

import jax  # noqa: E402
import numpy as np  # noqa: E402

from resunet_jax import losses, models  # noqa: E402
from resunet_jax.configs import train_section  # noqa: E402
from resunet_jax.training import parallel  # noqa: E402
from resunet_jax.training import state as state_lib  # noqa: E402

CONFIG = models.ModelConfig(base_width=4, depth=2, residual=True, norm='batch')


def batches(global_batch=8, size=16):
  rng = np.random.default_rng(0)
  for _ in range(3):
    yield {
      'image': rng.normal(size=(global_batch, size, size, 3)).astype(np.float32),
      'mask': (rng.random((global_batch, size, size)) > 0.7).astype(np.int32),
      'valid': np.ones(global_batch, np.float32),
    }


def run(strategy: str) -> dict:
  train_config = train_section()
  train_config.optimizer, train_config.learning_rate, train_config.num_steps = 'sgd', 0.1, 10
  mesh = parallel.make_mesh()
  model = models.UNet(CONFIG, axis_name=parallel.model_axis_name(strategy))
  optimizer = state_lib.make_optimizer(train_config)
  state = parallel.create_sharded(lambda: state_lib.create_train_state(model, optimizer, (1, 16, 16, 3), seed=0), mesh)
  train, _ = parallel.compile_steps(strategy, mesh, losses.LossWeights())
  sharding = parallel.batch_sharding(mesh)
  index, count = jax.process_index(), jax.process_count()
  for batch in batches():
    local = {k: np.split(v, count)[index] for k, v in batch.items()}
    state, _ = train(state, {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()})
  flat = jax.tree_util.tree_leaves_with_path({'params': state.params, 'batch_stats': state.batch_stats})
  result = {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in flat}
  result['compilations'] = np.asarray(train._cache_size())  # 3 steps, one compiled program
  return result


if __name__ == '__main__':
  out, strategy = sys.argv[1], sys.argv[2]
  if len(sys.argv) > 4:
    port, process_id, processes = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=processes, process_id=process_id)
  result = run(strategy)
  if jax.process_index() == 0:
    np.savez(out, **result)
  if len(sys.argv) > 4:
    jax.distributed.shutdown()
