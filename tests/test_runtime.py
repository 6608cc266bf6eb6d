"""The backend choice (`runtime`): which layer set each setting gives, and that it is no part of a run's identity."""

import pytest

from resunet_jax import configs, models, runtime
from resunet_jax.errors import UserError


def test_stock_is_the_stock_set_and_a_wrong_name_is_one_line():
  assert runtime.layers('stock') is models.STOCK
  with pytest.raises(UserError, match=r"^runtime.backend='mkl' is not a backend; valid: auto, stock, cpu$"):
    runtime.layers('mkl')


@pytest.mark.parametrize(
  ('platform', 'devices', 'avx512', 'loads', 'expected'),
  [
    ('cpu', 1, True, True, 'cpu'),
    ('cpu', 4, True, True, 'stock'),  # a custom call is not partitioned over a sharded batch
    ('cpu', 1, True, False, 'stock'),  # no oneDNN wheels, or no compiler: the stock set, logged
    ('cpu', 1, False, True, 'stock'),  # oneDNN 3.2's AVX2 kernels crashed here
    ('gpu', 1, True, True, 'stock'),
  ],
)
def test_auto_takes_the_cpu_set_on_one_avx512_cpu_device_where_it_loads(
  monkeypatch, platform, devices, avx512, loads, expected
):
  fake = models.Layers(name='cpu')  # stands in for the CPU set, which needs no loading here
  monkeypatch.setattr(runtime.jax, 'default_backend', lambda: platform)
  monkeypatch.setattr(runtime.jax, 'device_count', lambda: devices)
  monkeypatch.setattr(runtime, '_has_avx512', lambda: avx512)
  monkeypatch.setattr(runtime, '_cpu_layers', lambda: fake if loads else None)
  assert runtime.layers('auto').name == expected == runtime.auto_backend()


def test_cpu_where_it_cannot_load_says_why_in_one_line(monkeypatch):
  from resunet_jax.cpu import onednn

  def missing(distribution):
    raise onednn.importlib.metadata.PackageNotFoundError(distribution)

  monkeypatch.setattr(onednn.importlib.metadata, 'files', missing)
  monkeypatch.setattr(onednn, 'load', onednn.build)  # uncached: as on a machine without the wheels
  with pytest.raises(UserError, match=r"need the onednn-cpu-gomp package: pip install -e '\.\[cpu\]'"):
    runtime.layers('cpu')


def test_the_backend_is_not_part_of_a_runs_identity():
  base = configs.base_config().to_dict()
  stock = configs.base_config()
  stock.runtime.backend = 'stock'
  assert configs.config_hash(stock.to_dict()) == configs.config_hash(base)
  # A config.json written before runtime.backend kept it in the model section: the same run.
  legacy = {**base, 'model': {**base['model'], 'conv': 'xla'}}
  del legacy['runtime']
  assert configs.config_hash(legacy) == configs.config_hash(base)
  assert 'conv' not in models.ModelConfig.field_names()
