"""One of two JAX processes (2 CPU devices each) reading its shard; prints what it saw as JSON.

Usage: python two_process_worker.py PORT PROCESS_ID TFDS_DIR
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=2'

import jax  # noqa: E402
import numpy as np  # noqa: E402

from resunet_jax import data  # noqa: E402


def main(port: str, process_id: str, tfds_dir: str) -> None:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id))
  config = data.default_config()
  config.name, config.data_dir, config.image_size, config.read_threads = 'synthetic_roads/small', tfds_dir, 64, 2
  train = data.make_pipeline(config, 'train', batch_size=4, seed=0, train=True, num_epochs=1)
  train_ids = [str(i) for batch in train for i in batch['id']]
  evaluation = data.make_pipeline(config, 'validation', batch_size=3, seed=0, train=False)
  eval_ids = [str(i) for batch in evaluation for i, v in zip(batch['id'], batch['valid'], strict=True) if v]

  mesh = jax.sharding.Mesh(jax.devices(), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  local = next(iter(train))
  batch = data.to_global(local, sharding)
  shards = sorted(batch['image'].addressable_shards, key=lambda s: s.index[0].start)
  local_matches = bool(np.array_equal(np.concatenate([np.asarray(s.data) for s in shards]), local['image']))
  print(
    json.dumps(
      {
        'train_ids': train_ids,
        'eval_ids': eval_ids,
        'global_shape': list(batch['image'].shape),
        'mask_shape': list(batch['mask'].shape),
        'local_matches': local_matches,
      }
    )
  )
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(*sys.argv[1:4])
