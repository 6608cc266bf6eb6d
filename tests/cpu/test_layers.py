"""The CPU layer set against the stock one in whole models: parameters, values and every gradient.

Train and eval mode, BatchNorm statistics included, remat over the fused path; forward-mode
transformations get the one-line error naming the stock layers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quick_init

from resunet_jax import models, runtime
from resunet_jax.cpu import layers as cpu_layers
from resunet_jax.cpu import onednn

# JAX on the CPU (the custom calls are registered for it alone) and the `cpu` extra's wheels.
# Skipped only without the `cpu` extra: with its wheels installed, a failed build or load fails the tests.
pytestmark = pytest.mark.skipif(not onednn.installed(), reason='the cpu extra is not installed')

TINY = {'base_width': 4, 'depth': 2}
CASES = {
  'unet': models.preset('unet', **TINY),  # fused conv+ReLU, the decoder by output parity
  'resunet': models.preset('resunet', **TINY),  # + the decoder's 1x1 projection, upsampled after
  'resunet_zhang': models.preset('resunet_zhang', **TINY),  # BatchNorm, preact, stride: plain oneDNN convs
  'transpose_group': models.preset('resunet', upsample='transpose', norm='group', norm_groups=2, **TINY),
  'skips_01_remat': models.preset('unet', skips='01', remat=True, **TINY),  # remat over the fused path
  'batch_postact': models.preset('resunet', norm='batch', **TINY),  # fused decoder conv without its ReLU
  'identity_he': models.preset('resunet', shortcut='identity', init='he', **TINY),  # the fused 1x1 conv_in
  'attention_unet': models.preset('attention_unet', **TINY),  # the gates' 1x1 convs, a gated skip
  'unet_plusplus': models.preset('unet_plusplus', **TINY),  # nested skips of several tensors, two heads
}
X = jax.random.normal(jax.random.key(0), (2, 20, 24, 3))  # padded to 20x24: not square, not a power of 2


def _values_and_grads(config, layers, train):
  model = models.UNet(config, layers=layers)
  variables = quick_init.init(model, X, key=jax.random.key(1), train=False)
  probe = jax.random.normal(jax.random.key(2), (*X.shape[:3], 1))

  def loss(params, x):
    mutable = ['batch_stats'] if train and 'batch_stats' in variables else False
    out = model.apply({**variables, 'params': params}, x, train=train, mutable=mutable)
    logits, updates = out if mutable else (out, {})
    return jnp.sum(logits * probe), (logits, updates)

  (value, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
    variables['params'], X
  )
  return variables, value, logits, updates, grads


# `train` reaches only BatchNorm (models.blocks.make_norm): the training mode of the other cases
# is their inference mode again.
MODES = [(case, False) for case in sorted(CASES)] + [(c, True) for c in sorted(CASES) if CASES[c].norm == 'batch']


@pytest.mark.parametrize(('case', 'train'), MODES)
def test_cpu_layers_give_the_stock_parameters_values_and_gradients(case, train):
  stock = _values_and_grads(CASES[case], models.STOCK, train)
  cpu = _values_and_grads(CASES[case], cpu_layers.LAYERS, train)
  jax.tree.map(np.testing.assert_array_equal, stock[0], cpu[0])  # the same initialisers, the same tree
  for ours, reference in zip(cpu[1:], stock[1:], strict=True):  # value, logits, statistics, gradients
    # Float32 rounding, against each output's largest entry: a bias ahead of BatchNorm has a zero
    # gradient, which both compute as noise.
    scale = max((float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(reference)), default=0.0)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  if train and 'batch_stats' in stock[0]:
    assert jax.tree.leaves(cpu[3])  # BatchNorm's training path ran and updated its statistics


def _compiled_text(config, layers):
  model = models.UNet(config, layers=layers)
  variables = quick_init.init(model, X, key=jax.random.key(1), train=False)
  grad = jax.grad(lambda p: jnp.sum(model.apply({**variables, 'params': p}, X, train=False)))
  return jax.jit(grad).lower(variables['params']).compile().as_text()


def test_the_cpu_set_runs_onednn_and_the_stock_set_does_not():
  text = _compiled_text(CASES['resunet'], cpu_layers.LAYERS)
  for target in ('ConvForwardBiasRelu', 'ConvForwardBiasSum', 'ConvBackwardData', 'ConvBackwardWeights'):
    assert f'resunet_onednn_{target}' in text
  assert 'custom_call_target="resunet_onednn' not in _compiled_text(CASES['resunet'], models.STOCK)


def _forward_modes(model, variables):
  def f(x):
    return jnp.sum(model.apply(variables, x, train=False))

  return {
    'jvp': lambda: jax.jvp(f, (X,), (X,)),
    'jit_jvp': lambda: jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(X),
    'jacfwd': lambda: jax.jacfwd(f)(X[:1]),
    'hvp': lambda: jax.jvp(jax.grad(f), (X,), (X,)),
  }


@pytest.mark.parametrize('mode', ['jvp', 'jit_jvp', 'jacfwd', 'hvp'])
def test_forward_mode_through_the_cpu_set_names_the_stock_layers(mode):
  model = models.UNet(CASES['unet'], layers=cpu_layers.LAYERS)
  variables = quick_init.init(model, X, key=jax.random.key(1), train=False)
  with pytest.raises(
    onednn.ForwardModeError,
    match=r"reverse-mode only; .* use the stock layers \(models.STOCK, runtime.backend='stock'\)",
  ):
    _forward_modes(model, variables)[mode]()


def test_the_cpu_set_is_a_hashable_module_attribute_like_the_stock_one():
  assert hash(cpu_layers.LAYERS) != hash(models.STOCK) and cpu_layers.LAYERS.name == 'cpu'
  first = models.UNet(CASES['unet'], layers=cpu_layers.LAYERS)
  assert first == models.UNet(CASES['unet'], layers=functools.reduce(lambda a, _: a, [], cpu_layers.LAYERS))


def test_groupnorm_at_an_odd_width_has_the_stock_gradients():
  """Found by the study's depth stage (2026-12-02): compiled, the max-pool's gradient found no input
  equal to the forward's maxima in 225 windows at 66 channels (in NumPy all match), and every
  encoder gradient was non-finite (`cpu.layers._max_pool_bwd`)."""
  config = models.ModelConfig(base_width=33, depth=2, norm='group', init='he', skips='none')
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  y = (jax.random.uniform(jax.random.key(2), (2, 16, 16, 1)) > 0.9).astype(jnp.float32)
  variables = models.UNet(config).init(jax.random.key(0), x, train=False)
  grads = {}
  for name in ('stock', 'cpu'):
    model = models.UNet(config, layers=runtime.layers(name))

    def loss(params, model=model):
      logits = model.apply({**variables, 'params': params}, x, train=True)
      return jnp.mean(jnp.logaddexp(0, logits) - logits * y)

    grads[name] = jax.jit(jax.grad(loss))(variables['params'])
  for stock, cpu in zip(jax.tree.leaves(grads['stock']), jax.tree.leaves(grads['cpu']), strict=True):
    np.testing.assert_allclose(cpu, stock, rtol=1e-4, atol=1e-5)
