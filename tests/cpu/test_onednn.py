"""The CPU backend's kernels (`cpu.onednn`, `cpu.layers`) against XLA's and Flax's: values, every gradient, the HLO."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from resunet_jax import models, runtime
from resunet_jax.cpu import layers as cpu_layers
from resunet_jax.cpu import onednn

NHWC = ('NHWC', 'HWIO', 'NHWC')
# JAX on the CPU (the custom calls are registered for it alone) and the `cpu` extra's wheels.
# Skipped only without the `cpu` extra: with its wheels installed, a failed build or load fails the tests.
needs_onednn = pytest.mark.skipif(not onednn.installed(), reason='the cpu extra is not installed')


def _conv_and_grads(conv, x, w, strides, padding):
  def f(x, w):
    return conv(x, w, strides, padding, dimension_numbers=NHWC)

  probe = jax.random.normal(jax.random.key(9), jax.eval_shape(f, x, w).shape)

  def grads(x, w):
    return jax.grad(lambda x, w: jnp.sum(f(x, w) * probe), (0, 1))(x, w)

  # Both in one program, and the gradients alone (a kernel gradient that ran without its forward
  # convolution came out wrong once, where the two together were right).
  return jax.jit(lambda x, w: (f(x, w), grads(x, w)))(x, w), jax.jit(grads)(x, w)


@needs_onednn
@pytest.mark.parametrize(
  'x_shape, w_shape, strides, padding',
  [
    ((2, 9, 11, 3), (3, 3, 3, 5), (1, 1), 'SAME'),  # odd sizes, the network's first conv
    ((2, 9, 11, 4), (3, 3, 4, 6), (2, 2), 'SAME'),  # stride 2 on odd sizes: asymmetric padding
    ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), 'VALID'),  # a strided 1x1 projection shortcut
    ((1, 7, 5, 2), (3, 3, 2, 3), (1, 1), ((2, 0), (1, 1))),  # explicit, uneven padding
  ],
)
def test_forward_and_both_gradients_match_xla(x_shape, w_shape, strides, padding):
  keys = jax.random.split(jax.random.key(0))
  x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
  ours = _conv_and_grads(onednn.conv_general_dilated, x, w, strides, padding)
  xla = _conv_and_grads(lax.conv_general_dilated, x, w, strides, padding)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  text = jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)).lower(x, w)
  # A strided 1x1 convolution stays XLA's: oneDNN 3.2's kernel gradient of it is wrong.
  assert ('resunet_onednn' in text.as_text()) == (w_shape[:2] != (1, 1) or strides == (1, 1))


@needs_onednn
def test_kernel_gradient_alone_matches_xla():
  keys = jax.random.split(jax.random.key(1), 3)
  x, w = jax.random.normal(keys[0], (2, 9, 11, 3)), jax.random.normal(keys[1], (3, 3, 3, 5))
  dy = jax.random.normal(keys[2], (2, 5, 6, 5))
  xla = jax.vjp(lambda w: lax.conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=NHWC), w)[1](dy)[0]
  ours = jax.jit(lambda x, dy: onednn.kernel_gradient(x, dy, w.shape, (2, 2), 'SAME'))(x, dy)
  np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(xla))))


@needs_onednn
def test_the_step_holds_custom_calls_and_no_xla_convolution():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
  grad = jax.grad(lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC).sum(), (0, 1))
  text = jax.jit(grad).lower(x, w).compile().as_text()
  assert 'resunet_onednn_ConvBackwardData' in text and 'resunet_onednn_ConvBackwardWeights' in text
  assert 'convolution(' not in text


@needs_onednn
@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_fused_bias_relu_matches_xla(strides):
  keys = jax.random.split(jax.random.key(3), 4)
  x, w = jax.random.normal(keys[0], (2, 9, 10, 4)), jax.random.normal(keys[1], (3, 3, 4, 6))
  b = jax.random.normal(keys[2], (6,))  # about half the outputs below zero: the mask matters

  def unfused(x, w, b):
    return jax.nn.relu(lax.conv_general_dilated(x, w, strides, 'SAME', dimension_numbers=NHWC) + b)

  def fused(x, w, b):
    return onednn.conv_bias_relu(x, w, b, strides, 'SAME')

  probe = jax.random.normal(keys[3], jax.eval_shape(unfused, x, w, b).shape)
  results = [
    jax.jit(lambda x, w, b, f=f: (f(x, w, b), jax.grad(lambda *a: jnp.sum(f(*a) * probe), (0, 1, 2))(x, w, b)))(x, w, b)
    for f in (fused, unfused)
  ]
  assert 0.2 < float(jnp.mean(results[1][0] > 0)) < 0.8
  for a, b in zip(*map(jax.tree.leaves, results), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  text = jax.jit(fused).lower(x, w, b).compile().as_text()
  assert 'resunet_onednn_ConvForwardBiasRelu' in text


def _values_and_grads(f, probe, *args):
  """`f(*args)` and the gradients of `sum(f * probe)` with respect to every array argument."""
  argnums = tuple(i for i, a in enumerate(args) if a is not None)
  return jax.jit(lambda *a: (f(*a), jax.grad(lambda *a: jnp.sum(f(*a) * probe), argnums)(*a)))(*args)


def _assert_close(ours, reference):
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@needs_onednn
@pytest.mark.parametrize('relu', [True, False])
def test_fused_bias_and_sum_matches_xla_and_writes_over_the_summand(relu):
  keys = jax.random.split(jax.random.key(4), 5)
  x, w = jax.random.normal(keys[0], (2, 9, 10, 4)), jax.random.normal(keys[1], (3, 3, 4, 6))
  b, z = jax.random.normal(keys[2], (6,)), jax.random.normal(keys[3], (2, 9, 10, 6))

  def xla(x, w, b, z):
    y = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC) + b + z
    return jax.nn.relu(y) if relu else y

  def ours(x, w, b, z):
    return onednn.conv_bias_add(x, w, b, z, relu=relu)

  probe = jax.random.normal(keys[4], z.shape)
  _assert_close(_values_and_grads(ours, probe, x, w, b, z), _values_and_grads(xla, probe, x, w, b, z))
  text = jax.jit(ours).lower(x, w, b, z).compile().as_text()
  (call,) = [line for line in text.splitlines() if 'resunet_onednn_ConvForwardBiasSum' in line]
  assert 'output_to_operand_aliasing={{}: (3, {})}' in call  # the result is written over z
  with pytest.raises(ValueError, match=r'z has shape \(2, 9, 10, 5\), the convolution gives \(2, 9, 10, 6\)'):
    onednn.conv_bias_add(x, w, b, z[..., :5])


def _upsample_concat_conv_directly(low, skip, kernel, bias, relu):
  x = models.layers.upsample_nearest_2x(low)
  x = x if skip is None else jnp.concatenate([x, skip], axis=-1)
  y = lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=NHWC) + bias
  return jax.nn.relu(y) if relu else y


@needs_onednn
@pytest.mark.parametrize(
  'low_shape, skip_channels, size, relu, target',
  [
    ((2, 5, 7, 6), 3, 3, True, 'ConvForwardBiasSum'),  # the decoder's conv1, by output parity
    ((2, 5, 7, 6), None, 3, True, 'ConvForward'),  # a removed skip: the upsampled input alone
    ((2, 5, 7, 6), 3, 1, False, 'ConvForwardBiasSum'),  # the residual decoder's conv_proj
    ((1, 2, 3, 8), 4, 3, True, 'ConvForwardBiasRelu'),  # fewer positions (6) than channels: directly
  ],
)
def test_upsampled_concatenated_conv_matches_the_direct_form(low_shape, skip_channels, size, relu, target):
  keys = jax.random.split(jax.random.key(5), 5)
  batch, height, width, channels = low_shape
  low = jax.random.normal(keys[0], low_shape)
  skip = None if skip_channels is None else jax.random.normal(keys[1], (batch, 2 * height, 2 * width, skip_channels))
  kernel = jax.random.normal(keys[2], (size, size, channels + (skip_channels or 0), 5))
  bias = jax.random.normal(keys[3], (5,))
  probe = jax.random.normal(keys[4], (batch, 2 * height, 2 * width, 5))

  def ours(low, skip, kernel, bias):
    return cpu_layers.upsample_concat_conv(low, skip, kernel, bias, relu=relu)

  def direct(low, skip, kernel, bias):
    return _upsample_concat_conv_directly(low, skip, kernel, bias, relu)

  results = [_values_and_grads(f, probe, low, skip, kernel, bias) for f in (ours, direct)]
  if relu:
    assert 0.2 < float(jnp.mean(results[1][0] > 0)) < 0.8  # the mask matters
  _assert_close(*results)
  text = jax.jit(ours).lower(low, skip, kernel, bias).compile().as_text()
  assert f'resunet_onednn_{target}"' in text
  with pytest.raises(ValueError, match=rf'needs a \[1\|3, 1\|3, \d+, F\] kernel; got \({size}, {size}, 2, 5\)'):
    cpu_layers.upsample_concat_conv(low, skip, kernel[:, :, :2], bias, relu=relu)


@needs_onednn
def test_a_donated_optimizer_step_copies_no_kernel():
  """The kernel gradient waits for the input gradient, so the in-place update needs no copy.

  Without that order XLA copies every kernel at the start of the step (copy insertion: the
  update and the input gradient's read of the old kernel would be unordered).
  """
  model = models.UNet(models.preset('unet', base_width=4, depth=2), layers=cpu_layers.LAYERS)
  x = jnp.ones((2, 16, 16, 3))
  params = model.init(jax.random.key(0), x, train=False)['params']
  optimizer = optax.adam(1e-3)

  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean(model.apply({'params': p}, x, train=False) ** 2))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  text = jax.jit(step, donate_argnums=(0, 1)).lower(params, optimizer.init(params)).compile().as_text()
  entry = text[text.index('ENTRY') :]
  parameters = set(re.findall(r'%(\S+) = \S+ parameter\(', entry))
  kernels = [name for name in parameters if 'kernel' in name and name.startswith('params')]
  assert len(kernels) == 11  # 5 blocks of two 3x3 convolutions, and the head
  copied = set(re.findall(r'copy\(%(\S+?)\)', entry))
  assert not copied.intersection(kernels), sorted(copied.intersection(kernels))


@needs_onednn
def test_vmap_matches_xla():
  x, w = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4)), jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  ours = jax.jit(jax.vmap(lambda x: onednn.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)))(x)
  xla = jax.vmap(lambda x: lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC))(x)
  np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=1e-5)


def test_unsupported_cases_are_xla_convolutions():
  x, w = jnp.ones((1, 6, 6, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  text = jax.jit(lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)).lower(x, w)
  assert 'custom_call' not in text.as_text()
  x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((2, 2, 4, 4))
  dilated = jax.jit(
    lambda x, w: onednn.conv_general_dilated(x, w, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=NHWC)
  )
  assert 'custom_call' not in dilated.lower(x, w).as_text()


def test_onednn_without_its_wheel_says_what_to_install(monkeypatch):
  def missing(distribution):
    raise onednn.importlib.metadata.PackageNotFoundError(distribution)

  monkeypatch.setattr(onednn.importlib.metadata, 'files', missing)
  assert not onednn.installed()  # then the CPU tests skip; with the wheels, a failed build fails them
  with pytest.raises(onednn.OneDNNUnavailable, match=r"need the onednn-cpu-gomp package: pip install -e '\.\[cpu\]'"):
    onednn.build()


@needs_onednn
def test_a_missing_compiler_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setenv('RESUNET_JAX_CACHE', str(tmp_path))  # nothing built yet
  monkeypatch.setenv('CXX', 'no-such-compiler')
  with pytest.raises(onednn.OneDNNUnavailable, match="no C\\+\\+ compiler 'no-such-compiler' is on PATH"):
    onednn.build()


def test_transposed_conv_equals_flax():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  flax_up, ours = nn.ConvTranspose(4, (2, 2), strides=(2, 2)), cpu_layers.ConvTranspose2x2(4, (2, 2), strides=(2, 2))
  variables = flax_up.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, variables, ours.init(jax.random.key(1), x))
  variables = {'params': {**variables['params'], 'bias': jnp.arange(4.0)}}
  np.testing.assert_allclose(ours.apply(variables, x), flax_up.apply(variables, x), rtol=1e-6, atol=1e-6)


def test_max_pool_equals_flax_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8, 3))  # no ties
  flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
  np.testing.assert_array_equal(cpu_layers.max_pool_2x2(x), flax_pool(x))
  probe = jax.random.normal(jax.random.key(1), (2, 3, 4, 3))
  grad = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * probe))(x)  # noqa: E731
  np.testing.assert_array_equal(grad(cpu_layers.max_pool_2x2), grad(flax_pool))


def test_nearest_upsampling_equals_repeat_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  repeat = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # noqa: E731
  np.testing.assert_array_equal(cpu_layers.upsample_nearest_2x(x), repeat(x))
  probe = jax.random.normal(jax.random.key(1), (2, 6, 8, 5))
  grad = lambda up: jax.grad(lambda x: jnp.sum(up(x) * probe))(x)  # noqa: E731
  np.testing.assert_allclose(grad(cpu_layers.upsample_nearest_2x), grad(repeat), rtol=1e-6, atol=1e-6)


def test_max_pool_shares_the_gradient_between_tied_maxima():
  x = jnp.stack([jnp.array([[1.0, 3.0], [3.0, 2.0]]), jnp.array([[0.0, 0.0], [0.0, 0.0]])], axis=-1)[None]
  g = jax.grad(lambda x: jnp.sum(cpu_layers.max_pool_2x2(x) * jnp.array([2.0, 4.0])))(x)
  np.testing.assert_array_equal(g[0, :, :, 0], [[0.0, 1.0], [1.0, 0.0]])  # two tied 3s share 2
  np.testing.assert_array_equal(g[0, :, :, 1], [[1.0, 1.0], [1.0, 1.0]])  # four tied 0s share 4
  reference = jax.grad(lambda x: jnp.sum(x.reshape(1, 1, 2, 1, 2, 2).max(axis=(2, 4)) * jnp.array([2.0, 4.0])))(x)
  np.testing.assert_array_equal(g, reference)  # as jnp.max's own gradient


@needs_onednn
def test_a_failed_build_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setenv('RESUNET_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')  # a "compiler" that fails without a word
  with pytest.raises(onednn.OneDNNUnavailable, match=r'^compiling onednn_conv.cc failed \(false\): \(no output\)$'):
    onednn.build()
  assert not list(tmp_path.iterdir())  # no half-written library left behind


@pytest.mark.parametrize(
  'error, level',
  [(onednn.OneDNNNotInstalled('no wheel'), 'INFO'), (onednn.OneDNNUnavailable('compiling failed'), 'WARNING')],
)
def test_auto_says_why_it_falls_back_to_the_stock_layers(monkeypatch, caplog, error, level):
  def fail():
    raise error

  monkeypatch.setattr(cpu_layers, 'layers', fail)
  runtime._cpu_layers.cache_clear()
  try:
    with caplog.at_level('INFO'):
      assert runtime._cpu_layers() is None
  finally:
    runtime._cpu_layers.cache_clear()
  (record,) = [r for r in caplog.records if 'Using the stock layers' in r.getMessage()]
  assert record.levelname == level and str(error) in record.getMessage()
