"""3D networks (`ModelConfig.spatial_dims=3`): shapes, parameters, anisotropic pooling, knock-outs, errors.

Each preset's 3D network, at odd sizes and through grad, jvp, vmap and export, is in
test_transformations.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quick_init

from resunet_jax import configs, models, runtime
from resunet_jax.errors import UserError

TINY = {'base_width': 2, 'depth': 2, 'spatial_dims': 3}
VOLUME = jax.random.normal(jax.random.key(1), (1, 4, 8, 8, 1))


def _init(config, x=VOLUME):
  return quick_init.init(models.UNet(config), x, train=False)


def test_a_3d_unet_has_cubic_kernels_and_the_2d_counts_with_27_taps():
  config = models.ModelConfig(**TINY)
  params = _init(config)['params']
  assert params['enc_0']['conv1']['kernel'].shape == (3, 3, 3, 1, 2)
  assert params['head']['kernel'].shape == (1, 1, 1, 2, 1)

  def count(i, o):  # a 3x3x3 convolution from i to o channels
    return 27 * i * o + o

  expected = (
    count(1, 2)
    + count(2, 2)
    + count(2, 4)
    + count(4, 4)
    + count(4, 8)
    + count(8, 8)  # encoder, bottleneck
    + count(8 + 4, 4)
    + count(4, 4)
    + count(4 + 2, 2)
    + count(2, 2)  # decoder: upsampled + skip channels
    + 2
    + 1  # head
  )
  assert models.count_params(params) == expected


def test_pool_strides_follow_nnunets_spacing_rule():
  # 3 mm slices, 0.8 mm pixels: the slices wait until the in-plane spacing (1.6, then 3.2) catches up.
  assert models.pool_strides_for_spacing((3.0, 0.8, 0.8), 4) == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
  assert models.pool_strides_for_spacing((5.0, 0.7, 0.7), 3) == ((1, 2, 2), (1, 2, 2), (2, 2, 2))
  assert models.pool_strides_for_spacing((1.0, 1.0, 1.0), 2) == ((2, 2, 2), (2, 2, 2))
  with pytest.raises(ValueError, match='positive size per spatial axis'):
    models.pool_strides_for_spacing((1.0, 0.0, 1.0), 2)


def test_an_axis_of_stride_1_keeps_its_size_at_that_level():
  config = models.ModelConfig(pool_strides=((1, 2, 2), (2, 2, 2)), **TINY)
  assert config.multiples() == (2, 4, 4)
  x = jax.random.normal(jax.random.key(3), (1, 2, 8, 8, 1))  # depth 2 fits: only one halving of it
  variables = _init(config, x)
  _, state = models.UNet(config).apply(variables, x, train=False, capture_intermediates=True, mutable=['intermediates'])
  shapes = {name: state['intermediates'][name]['__call__'][0].shape for name in ('enc_0', 'enc_1', 'bottleneck')}
  assert shapes == {'enc_0': (1, 2, 8, 8, 2), 'enc_1': (1, 2, 4, 4, 4), 'bottleneck': (1, 1, 2, 2, 8)}
  # The transposed upsampling undoes each level's own strides.
  transposed = config.replace(upsample='transpose')
  kernels = _init(transposed, x)['params']
  assert kernels['dec_0']['up']['kernel'].shape[:3] == (1, 2, 2)
  assert kernels['dec_1']['up']['kernel'].shape[:3] == (2, 2, 2)


@pytest.mark.parametrize('skip_kind', ['concat', 'attention'])
def test_a_zero_skip_scale_in_3d_equals_the_network_without_that_skip(skip_kind):
  config = models.ModelConfig(skip_kind=skip_kind, pool_strides=((1, 2, 2), (2, 2, 2)), **TINY)
  variables = _init(config)
  knocked_out = models.UNet(config).apply(variables, VOLUME, train=False, skip_scale=jnp.array([0.0, 1.0]))
  without = config.replace(skips='01')
  params = dict(variables['params'])
  params.pop('gate_0', None)
  params['dec_0'] = {**params['dec_0'], 'conv1': {**params['dec_0']['conv1']}}
  params['dec_0']['conv1']['kernel'] = params['dec_0']['conv1']['kernel'][..., :4, :]  # the upsampled channels
  reference = models.UNet(without).apply({'params': params}, VOLUME, train=False)
  np.testing.assert_allclose(knocked_out, reference, rtol=1e-5, atol=1e-6)


def test_a_residual_3d_network_takes_residual_and_gate_scales():
  config = models.preset('resunet', skip_kind='attention', **TINY)
  variables = _init(config)
  model = models.UNet(config)
  plain = model.apply(variables, VOLUME, train=False)
  ones = model.apply(variables, VOLUME, train=False, residual_scale=jnp.ones(5), gate_open=jnp.zeros(2))
  np.testing.assert_array_equal(plain, ones)
  opened = model.apply(variables, VOLUME, train=False, gate_open=jnp.ones(2))
  assert not np.allclose(opened, plain, atol=1e-5)


def test_a_pruned_3d_unet_plusplus_is_its_sub_network():
  config = models.preset('unet_plusplus', pool_strides=((1, 2, 2), (2, 2, 2)), **TINY)
  variables = _init(config)
  sub, sub_variables = models.prune(config, variables, 1)
  assert sub.pool_strides == ((1, 2, 2),)
  np.testing.assert_allclose(
    models.UNet(sub).apply(sub_variables, VOLUME, train=False),
    models.UNet(config).apply(variables, VOLUME, train=False, prune_level=1),
    rtol=1e-5,
    atol=1e-6,
  )


def test_a_2d_image_to_a_3d_network_is_refused_in_one_line():
  config = models.ModelConfig(**TINY)
  variables = _init(config)
  with pytest.raises(ValueError, match=r'spatial_dims=3\) takes \[B, D, H, W, C\] volumes; got shape \(1, 8, 8, 1\)'):
    models.UNet(config).apply(variables, VOLUME[:, 0], train=False)


@pytest.mark.parametrize(
  ('fields', 'message'),
  [
    ({'spatial_dims': 4}, 'must be 2 .images. or 3 .volumes.'),
    ({'spatial_dims': 3, 'pool_strides': ((2, 2), (2, 2))}, 'needs 2 entries .one per level. of 3 strides'),
    ({'spatial_dims': 3, 'pool_strides': ((2, 2, 3), (2, 2, 2))}, 'every one 1 or 2'),
    ({'spatial_dims': 3, 'pool_strides': ((2, 2, 2),)}, 'needs 2 entries'),
  ],
)
def test_bad_spatial_settings_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    models.ModelConfig(depth=2, **fields)


def test_the_cpu_backend_is_not_offered_a_volume():
  config = models.ModelConfig(**TINY)
  assert runtime.layers('auto', config) is models.STOCK
  with pytest.raises(UserError, match='runtime.backend=cpu has 2D layers of stride 2 only'):
    runtime.layers('cpu', config)


def test_2d_configs_keep_their_run_hashes():
  # The new fields at their 2D defaults are left out of the hash (configs.ADDED_KEYS).
  resolved = {'model': models.ModelConfig(depth=2).to_dict(), 'seed': 0}
  earlier = {'model': {k: v for k, v in resolved['model'].items() if k not in ('spatial_dims', 'pool_strides')}}
  earlier['seed'] = 0
  assert configs.config_hash(resolved) == configs.config_hash(earlier)
  volume = {**resolved, 'model': {**resolved['model'], 'spatial_dims': 3}}
  assert configs.config_hash(volume) != configs.config_hash(resolved)
