"""Retention keeps the latest checkpoints and the best, never deleting the latest; bad ones are skipped."""

import jax
import jax.numpy as jnp
import numpy as np

from resunet_jax import data
from resunet_jax.training import checkpoint


def _iterator(data_config):
  return iter(data.make_pipeline(data_config, 'train', batch_size=2, seed=0, train=True))


def test_latest_and_each_members_best_are_kept(tmp_path, data_config):
  best = ('dice_0', 'dice_1')  # two members, each keeps its own best
  ckpt = checkpoint.Checkpoints(tmp_path, keep=2, keep_best=1, best_metrics=best)
  iterator = _iterator(data_config)
  scores = [(0.9, 0.1), (0.1, 0.2), (0.2, 0.8), (0.3, 0.3), (0.4, 0.4)]
  for step, (first, second) in enumerate(scores, start=1):
    metrics = {'dice_0': first, 'dice_1': second}
    ckpt.save(step, {'w': jnp.full(3, step, jnp.float32)}, [iterator], {'step': step}, metrics=metrics)
  ckpt.save(6, {'w': jnp.full(3, 6, jnp.float32)}, [iterator], {'step': 6})  # no metrics: kept as latest
  ckpt.wait()
  assert ckpt.steps() == [1, 3, 5, 6]
  assert ckpt.read_config() == {'step': 6}
  ckpt.close()
  reopened = checkpoint.Checkpoints(tmp_path, keep=2, keep_best=1, best_metrics=best)  # as a restarted run sees it
  assert (reopened.best_step('dice_0'), reopened.best_step('dice_1')) == (1, 3)
  reopened.save(7, {'w': jnp.full(3, 7, jnp.float32)}, [iterator], {'step': 7}, metrics={'dice_0': 0.5, 'dice_1': 0.5})
  reopened.wait()
  assert reopened.steps() == [1, 3, 6, 7]  # the bests from before the restart are still kept
  reopened.close()


def _two_checkpoints(directory, data_config):
  """Checkpoints at steps 1 and 2 holding `w = [step] * 3`."""
  ckpt = checkpoint.Checkpoints(directory, keep=3)
  iterator = _iterator(data_config)
  for step in (1, 2):
    next(iterator)
    ckpt.save(step, {'w': jnp.full(3, step, jnp.float32)}, [iterator], {})
  ckpt.wait()
  return ckpt


def _abstract():
  return checkpoint.abstract_like({'w': jnp.zeros(3, jnp.float32)}, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_unreadable_latest_falls_back_to_the_previous(tmp_path, data_config):
  ckpt = _two_checkpoints(tmp_path, data_config)
  for path in (tmp_path / '2' / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'corrupt')
  state, step = ckpt.restore(_abstract(), [_iterator(data_config)])
  assert step == 1
  np.testing.assert_array_equal(state['w'], [1, 1, 1])
  ckpt.close()


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, data_config):
  import pytest

  from resunet_jax.errors import UserError

  ckpt = checkpoint.Checkpoints(tmp_path, keep=3)
  iterator = _iterator(data_config)
  ckpt.save(1, {'w': jnp.ones(3, jnp.float32)}, [iterator], {})
  ckpt.wait()
  for path in (tmp_path / '1' / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'corrupt')
  with pytest.raises(UserError, match=r'no checkpoint in .* can be restored \(step 1: .*\); repair them or move'):
    ckpt.restore(_abstract(), [_iterator(data_config)])
  ckpt.close()


def test_latest_with_files_removed_falls_back_with_a_warning_naming_it(tmp_path, data_config, caplog):
  _two_checkpoints(tmp_path, data_config).close()
  removed = [p for p in (tmp_path / '2' / 'state').rglob('*') if p.is_file()]
  assert removed
  for path in removed[: len(removed) // 2 + 1]:  # a copy cut short: some of its files are missing
    path.unlink()
  reopened = checkpoint.Checkpoints(tmp_path, keep=3)
  with caplog.at_level('WARNING'):
    state, step = reopened.restore(_abstract(), [_iterator(data_config)])
  assert step == 1
  np.testing.assert_array_equal(state['w'], [1, 1, 1])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING' and 'unreadable' in r.getMessage()]
  assert len(warnings) == 1 and str(tmp_path / '2') in warnings[0]
  reopened.close()
