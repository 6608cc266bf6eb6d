"""ConvBlock against its formula, computed by hand with lax convolutions, and its decoder form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import models, runtime


def _conv(x, layer):
  y = jax.lax.conv_general_dilated(
    x, layer['kernel'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest'
  )
  return y + layer['bias']


@pytest.mark.parametrize('scale', [None, 0.5])
def test_identity_shortcut_block_follows_the_formula(scale):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 5))
  block = models.ConvBlock(features=5, residual=True)
  params = block.init(jax.random.key(1), x, False)['params']
  assert set(params) == {'conv1', 'conv2'}  # channels match: identity shortcut
  out = block.apply({'params': params}, x, False, scale)
  branch = jax.nn.relu(_conv(jax.nn.relu(_conv(x, params['conv1'])), params['conv2']))
  expected = branch + (1.0 if scale is None else scale) * x
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_projection_shortcut_and_plain_block():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  block = models.ConvBlock(features=6, residual=True)
  params = block.init(jax.random.key(1), x, False)['params']
  assert params['conv_proj']['kernel'].shape == (1, 1, 3, 6)
  branch = jax.nn.relu(_conv(jax.nn.relu(_conv(x, params['conv1'])), params['conv2']))
  out = block.apply({'params': params}, x, False)
  np.testing.assert_allclose(out, branch + _conv(x, params['conv_proj']), rtol=1e-5, atol=1e-5)
  plain = models.ConvBlock(features=6, residual=False)
  plain_params = {k: v for k, v in params.items() if k != 'conv_proj'}
  np.testing.assert_allclose(plain.apply({'params': plain_params}, x, False), branch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_identity_shortcut_kind_projects_once_then_adds_the_identity(stride):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  block = models.ConvBlock(features=6, residual=True, shortcut='identity', stride=stride)
  params = block.init(jax.random.key(1), x, False)['params']
  assert set(params) == {'conv_in', 'conv1', 'conv2'}
  assert params['conv_in']['kernel'].shape == (1, 1, 3, 6) and params['conv1']['kernel'].shape == (3, 3, 6, 6)
  entry = _conv(x, params['conv_in'])[:, ::stride, ::stride]  # a strided 1x1 conv samples every other pixel
  branch = jax.nn.relu(_conv(jax.nn.relu(_conv(entry, params['conv1'])), params['conv2']))
  out = block.apply({'params': params}, x, False, 0.5)
  np.testing.assert_allclose(out, branch + 0.5 * entry, rtol=1e-5, atol=1e-5)
  # Where the shape is kept there is nothing to project: the same block as 'projection'.
  same = models.ConvBlock(features=3, residual=True, shortcut='identity')
  assert set(same.init(jax.random.key(1), x, False)['params']) == {'conv1', 'conv2'}


@pytest.mark.parametrize(('init', 'variance'), [('lecun', 1 / 288), ('glorot', 2 / (288 + 576)), ('he', 2 / 288)])
def test_kernel_initialiser_sets_the_variance(init, variance):
  x = jnp.ones((1, 4, 4, 32))  # conv1 is 3x3, 32 -> 64: fan-in 288, fan-out 576
  params = models.ConvBlock(features=64, initializer=init).init(jax.random.key(0), x, False)['params']
  assert abs(np.asarray(params['conv1']['kernel']).var() / variance - 1) < 0.05
  assert not np.asarray(params['conv1']['bias']).any()


def test_group_norm_uses_a_divisor_of_narrow_widths():
  x = jnp.ones((1, 4, 4, 3))
  params = models.ConvBlock(features=12, norm='group', norm_groups=8).init(jax.random.key(0), x, False)
  assert params['params']['norm1']['scale'].shape == (12,)  # gcd(8, 12) = 4 groups
  assert (
    models.make_norm(
      'group', 12, train=False, groups=8, dtype=jnp.float32, param_dtype=jnp.float32, axis_name=None, name='n'
    ).num_groups
    == 4
  )


@pytest.mark.parametrize('backend', ['stock', 'cpu'])
@pytest.mark.parametrize(
  'skip_channels, features',
  [(3, 4), (3, 6), (None, 3)],  # projected; identity (3 + 3 = 6 channels); no skip, identity
)
def test_decoder_block_is_the_block_of_its_upsampled_concatenated_input(backend, skip_channels, features):
  if backend == 'cpu' and not runtime.cpu_backend_available():
    pytest.skip('no CPU backend here')
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 4, 5, 3))
  skip = None if skip_channels is None else jax.random.normal(keys[1], (2, 8, 10, skip_channels))
  joined = models.layers.concat_skip(models.layers.upsample_nearest_2x(x), skip)
  layers = runtime.layers(backend)
  decoder = models.ConvBlock(features=features, residual=True, upsample='nearest', layers=layers)
  block = models.ConvBlock(features=features, residual=True, layers=layers)
  params = block.init(keys[2], joined, False)
  assert jax.tree.map(jnp.shape, decoder.init(keys[2], x, False, None, skip)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(
    decoder.apply(params, x, False, 0.5, skip), block.apply(params, joined, False, 0.5), rtol=1e-5, atol=1e-5
  )


def test_a_skip_without_upsampling_is_refused():
  x = jnp.ones((1, 4, 4, 2))
  with pytest.raises(ValueError, match='ConvBlock got a skip tensor but upsample=None'):
    models.ConvBlock(features=3).init(jax.random.key(0), x, False, None, x)
