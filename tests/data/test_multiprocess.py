"""Two local JAX processes read disjoint shards that together cover the split."""

import json
import pathlib
import sys

import portpicker

WORKER = pathlib.Path(__file__).with_name('two_process_worker.py')


def test_two_processes_get_disjoint_covering_shards(tfds_dir, commands):
  port = portpicker.pick_unused_port()
  workers = [commands.start([sys.executable, str(WORKER), str(port), str(i), tfds_dir]) for i in range(2)]
  results = []
  for worker in workers:
    out, err = worker.communicate(timeout=180)
    assert worker.returncode == 0, err[-2000:]
    results.append(json.loads(out.strip().splitlines()[-1]))

  train = [set(r['train_ids']) for r in results]
  assert [len(r['train_ids']) for r in results] == [32, 32]
  assert not train[0] & train[1] and train[0] | train[1] == {f'train_{i:05d}' for i in range(64)}
  evaluation = [set(r['eval_ids']) for r in results]
  assert not evaluation[0] & evaluation[1]
  assert evaluation[0] | evaluation[1] == {f'validation_{i:05d}' for i in range(16)}
  for r in results:  # 4 local examples per process -> one global batch of 8 over 4 devices
    assert r['global_shape'] == [8, 64, 64, 3] and r['mask_shape'] == [8, 64, 64]
    assert r['local_matches']
