"""ConvBlock against its formula, computed by hand with lax convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import models


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
