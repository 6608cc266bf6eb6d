"""UNet: pinned parameter counts, every switch, knock-out scales, sizes, dtypes, remat."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import quick_init

from resunet_jax import losses, models

KEY = jax.random.key(0)


def _init(config, x):
  return quick_init.init(models.UNet(config), x, key=KEY, train=False)


def _apply(config, variables, x, **kwargs):
  return models.UNet(config).apply(variables, x, train=False, **kwargs)


def _images(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def _abstract_params(config, hw):
  x = jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32)
  return jax.eval_shape(lambda x: models.UNet(config).init(KEY, x, train=False), x)['params']


@pytest.mark.parametrize(
  ('name', 'size', 'expected'),
  [
    ('unet', 128, 31_378_945),
    ('resunet', 128, 33_122_881),
    ('resunet_identity', 128, 33_158_017),
    ('resunet_zhang', 224, 8_220_993),
    ('attention_unet', 128, 31_902_149),  # 'unet' + 523,204 for the four gates (models.config.PRESETS)
    ('unet_plusplus', 128, 9_042_276),  # Zhou et al.'s 9.04M at one input channel (models.config.PRESETS)
  ],
)
def test_preset_parameter_counts_are_pinned(name, size, expected):
  config = models.preset('resunet', shortcut='identity') if name == 'resunet_identity' else models.preset(name)
  assert models.count_params(_abstract_params(config, size)) == expected


def test_note_resunet_projects_every_block():
  params = _abstract_params(models.preset('resunet'), 128)
  names = models.block_names(models.preset('resunet'))
  assert all('conv_proj' in params[name] for name in names)
  assert params['dec_3']['conv_proj']['kernel'].shape == (1, 1, 1536, 512)
  assert params['enc_0']['conv_proj']['kernel'].shape == (1, 1, 3, 64)


# Tiny networks: depth 2, widths 4 / 8 / 16, on inputs that are not multiples of 4.
TINY = {'base_width': 4, 'depth': 2}
X_TINY = _images((2, 10, 14, 3))
MASKS_TINY = (_images((2, 10, 14), seed=2) > 0.5).astype(jnp.int32)


def _expected_decoder_inputs(config):
  """Input channels of each decoder block (`dec_l`, or the nested `x_i_j`) implied by the switches."""
  widths, inputs = config.widths(), {}
  for name in models.block_names(config)[config.depth + 1 :]:
    level, column = (int(n) for n in name.split('_')[1:]) if config.skip_kind == 'nested' else (int(name[4:]), 1)
    up = widths[level] if config.upsample == 'transpose' else widths[level + 1]
    inputs[name] = up + (column * widths[level] if config.skip_levels[level] else 0)
  return inputs


SKIPS = ('all', 'none', '10')


def _switch_grid():
  """Every skip kind x norm, each with residual blocks and without; `upsample`, `skips` and
  `deep_supervision` rotate through them so that each skip kind meets each upsample mode and each
  skips value with both block kinds, with and without deep supervision (24 cases: the whole
  product, 216, costs minutes of compilation for no path these do not take)."""
  for kind, (n, norm), residual in itertools.product(
    models.config.SKIP_KINDS, enumerate(models.config.NORMS), (False, True)
  ):
    u = (n + 2 * residual) % 3
    yield kind, SKIPS[(n + residual) % 3], residual, norm, models.config.UPSAMPLES[u], (n + residual) % 2 == 0


@pytest.mark.parametrize(('skip_kind', 'skips', 'residual', 'norm', 'upsample', 'deep'), list(_switch_grid()))
def test_every_switch_combination_builds_and_trains_a_step(skip_kind, skips, residual, norm, upsample, deep):
  config = models.ModelConfig(
    skip_kind=skip_kind, skips=skips, residual=residual, norm=norm, upsample=upsample, deep_supervision=deep, **TINY
  )
  variables = _init(config, X_TINY)
  params = variables['params']
  names = models.block_names(config)
  gates = {f'gate_{level}' for level in range(2) if skip_kind == 'attention' and config.skip_levels[level]}
  aux = {f'aux_{level}' for level in range(1, 2) if deep}
  assert set(params) == {*names, 'head', *gates, *aux}
  for name in names[3:]:  # the learned upsampling lives in its decoder block
    width = 4 if name.startswith(('dec_0', 'x_0')) else 8
    assert ('up' in params[name]) == (upsample == 'transpose')
    if upsample == 'transpose':
      assert params[name]['up']['kernel'].shape == (2, 2, 2 * width, width)
  assert ('batch_stats' in variables) == (norm == 'batch')
  in_channels = {'enc_0': 3, 'enc_1': 4, 'bottleneck': 8, **_expected_decoder_inputs(config)}
  out_channels = {'enc_0': 4, 'enc_1': 8, 'bottleneck': 16, 'dec_1': 8, 'dec_0': 4, 'x_1_1': 8, 'x_0_1': 4, 'x_0_2': 4}
  for name in names:
    block = params[name]
    assert block['conv1']['kernel'].shape == (3, 3, in_channels[name], out_channels[name])
    assert ('conv_proj' in block) == (residual and in_channels[name] != out_channels[name])
    assert ('norm1' in block) == (norm != 'none')

  def loss(params):  # one training step's loss, every head counted
    heads, updates = models.UNet(config).apply(
      {**variables, 'params': params}, X_TINY, train=True, all_heads=True, mutable=['batch_stats']
    )
    return losses.segmentation_loss(heads, MASKS_TINY, jnp.ones(2), losses.LossWeights()), (heads, updates)

  (value, (heads, updates)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert len(heads) == (2 if deep else 1)
  assert all(h.shape == (2, 10, 14, 1) and h.dtype == jnp.float32 for h in heads)
  assert np.isfinite(float(value))
  norms = {name: float(optax.tree.norm(g)) for name, g in grads.items()}
  # Every block and head learns, except X^{0,1} of a UNet++ whose level 0 has no skip and no
  # auxiliary head: nothing reads it.
  unread = {'x_0_1'} if skip_kind == 'nested' and not config.skip_levels[0] and not deep else set()
  assert all(np.isfinite(n) for n in norms.values()), norms
  assert {name for name, n in norms.items() if n == 0} == unread, norms
  if norm == 'batch':
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates['batch_stats'], variables['batch_stats'])
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize(
  ('block', 'downsample', 'skip_kind'),
  [
    ('postact', 'stride', 'concat'),
    ('preact', 'maxpool', 'concat'),
    ('preact', 'stride', 'concat'),
    ('preact', 'stride', 'attention'),
    ('preact', 'stride', 'nested'),
    ('postact', 'stride', 'nested'),
  ],
)
def test_block_and_downsample_variants(block, downsample, skip_kind):
  config = models.ModelConfig(
    block=block, downsample=downsample, skip_kind=skip_kind, residual=True, norm='batch', **TINY
  )
  variables = _init(config, X_TINY)
  logits, state = models.UNet(config).apply(variables, X_TINY, train=False, capture_intermediates=True)
  assert logits.shape == (2, 10, 14, 1)
  shapes = {name: state['intermediates'][name]['__call__'][0].shape for name in models.block_names(config)}
  # Padded to 12x16; each encoder level halves the resolution, whether by pool or stride.
  assert shapes['enc_0'] == (2, 12, 16, 4) and shapes['enc_1'] == (2, 6, 8, 8)
  assert shapes['bottleneck'] == (2, 3, 4, 16)
  params = variables['params']
  # The first preact unit convolves the raw input (Zhang et al.): no norm before its conv1.
  assert ('norm1' in params['enc_0']) == (block == 'postact')
  assert 'norm1' in params['enc_1']
  if skip_kind == 'nested':  # every node of a level at that level's resolution
    assert shapes['x_0_1'] == shapes['x_0_2'] == (2, 12, 16, 4) and shapes['x_1_1'] == (2, 6, 8, 8)


def test_a_deeper_odd_width_network_with_attention_gates():  # nested at depth 3: the pruning tests
  config = models.ModelConfig(skip_kind='attention', base_width=3, depth=4, residual=True, deep_supervision=True)
  x = _images((1, 19, 23, 3))
  variables = _init(config, x)
  # one compiled program: op-by-op, this network's 19x23 shapes cost 4.7 s of compilations against 0.5 s
  heads = jax.jit(lambda v, x: models.UNet(config).apply(v, x, train=False, all_heads=True))(variables, x)
  assert [h.shape for h in heads] == [(1, 19, 23, 1)] * 4 and all(np.isfinite(np.asarray(h)).all() for h in heads)
  assert models.count_params(variables['params']) == models.count_params(_abstract_params(config, 16))


def _drop_skip(variables, config, level):
  """The variables of `config` without the level's skip: the skip-channel slice removed."""
  up = config.widths()[level] if config.upsample == 'transpose' else config.widths()[level + 1]

  def cut(path, leaf):
    names = [getattr(p, 'key', None) for p in path]
    if names[1] != f'dec_{level}' and not names[1].startswith(f'x_{level}_'):  # every node of a nested level
      return leaf
    if names[2] in ('conv1', 'conv_proj') and names[3] == 'kernel':
      return leaf[:, :, :up, :]
    if names[2] == 'norm1' and config.block == 'preact':  # Normalises the concatenated input.
      return leaf[:up]
    return leaf

  return jax.tree_util.tree_map_with_path(cut, variables)


@pytest.mark.parametrize(
  ('residual', 'norm', 'upsample', 'block'),
  [
    (False, 'none', 'nearest', 'postact'),
    (True, 'none', 'nearest', 'postact'),
    (True, 'batch', 'bilinear', 'postact'),
    (False, 'none', 'transpose', 'postact'),
    (True, 'batch', 'nearest', 'preact'),
    (True, 'group', 'bilinear', 'nested'),
  ],
)
@pytest.mark.parametrize('level', [0, 1])
def test_zero_skip_scale_equals_network_without_that_skip(residual, norm, upsample, block, level):
  nested = {'skip_kind': 'nested'} if block == 'nested' else {'block': block}
  config = models.ModelConfig(residual=residual, norm=norm, upsample=upsample, **nested, **TINY)
  variables = _init(config, X_TINY)
  scale = jnp.ones(2).at[level].set(0.0)
  knocked_out = _apply(config, variables, X_TINY, skip_scale=scale)

  without = config.replace(skips=''.join('0' if i == level else '1' for i in range(2)))
  reference_variables = _drop_skip(variables, config, level)
  assert jax.tree.map(jnp.shape, reference_variables) == jax.tree.map(jnp.shape, _init(without, X_TINY))
  reference = _apply(without, reference_variables, X_TINY)
  # Mathematically identical; only the convolution's summation order differs.
  np.testing.assert_allclose(knocked_out, reference, rtol=1e-5, atol=1e-6)
  assert not np.allclose(knocked_out, _apply(config, variables, X_TINY), atol=1e-4)


def test_unit_scales_equal_the_plain_call():
  config = models.ModelConfig(residual=True, norm='batch', **TINY)
  variables = _init(config, X_TINY)
  plain = _apply(config, variables, X_TINY)
  scaled = _apply(config, variables, X_TINY, skip_scale=jnp.ones(2), residual_scale=jnp.ones(5))
  np.testing.assert_array_equal(plain, scaled)


def test_zero_residual_scale_equals_plain_network_without_projections():
  config = models.ModelConfig(residual=True, **TINY)
  variables = _init(config, X_TINY)
  knocked_out = _apply(config, variables, X_TINY, residual_scale=jnp.zeros(5))
  plain = config.replace(residual=False)
  params = {name: {k: v for k, v in block.items() if k != 'conv_proj'} for name, block in variables['params'].items()}
  np.testing.assert_array_equal(knocked_out, _apply(plain, {'params': params}, X_TINY))


@pytest.mark.parametrize('block', [2, 4])  # the bottleneck (identity shortcut: a 1x1 conv_in), a decoder block
def test_zero_branch_scale_keeps_the_shortcut_alone(block):
  config = models.ModelConfig(residual=True, shortcut='identity', **TINY)
  variables = _init(config, X_TINY)
  name = models.block_names(config)[block]
  scale = jnp.ones(5).at[block].set(0.0)
  knocked_out = _apply(config, variables, X_TINY, branch_scale=scale)
  # Without normalisation the branch ends in relu(conv2): zero conv2 and the branch is 0 everywhere.
  zeroed = jax.tree.map(lambda v: v, variables)
  zeroed['params'][name]['conv2'] = jax.tree.map(jnp.zeros_like, variables['params'][name]['conv2'])
  np.testing.assert_array_equal(knocked_out, _apply(config, zeroed, X_TINY))
  assert not np.allclose(knocked_out, _apply(config, variables, X_TINY), atol=1e-4)
  unit = _apply(config, variables, X_TINY, branch_scale=jnp.ones(5), skip_scale=jnp.ones(2), skip_fill=_fills(config))
  np.testing.assert_array_equal(unit, _apply(config, variables, X_TINY))  # ones: the plain call, fill unread


def _fills(config, seed=3):
  widths = config.widths()
  return [jax.random.normal(jax.random.key(seed + level), (widths[level],)) for level in range(config.depth)]


def test_skip_fill_is_what_a_zero_skip_scale_hands_the_decoder():
  config = models.ModelConfig(residual=True, **TINY)
  variables = _init(config, X_TINY)
  fills = _fills(config)
  seen = {}

  def record(next_fun, args, kwargs, context):  # the skip tensor each decoder block receives
    if context.method_name == '__call__' and context.module.name in ('dec_0', 'dec_1'):
      seen[context.module.name] = args[3]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    out = _apply(config, variables, X_TINY, skip_scale=jnp.array([0.0, 1.0]), skip_fill=fills)
  np.testing.assert_array_equal(seen['dec_0'], jnp.broadcast_to(fills[0], seen['dec_0'].shape))
  assert not np.allclose(seen['dec_1'], fills[1])  # level 1 is kept
  zero_fill = [jnp.zeros_like(f) for f in fills]
  zeroed = _apply(config, variables, X_TINY, skip_scale=jnp.array([0.0, 1.0]), skip_fill=zero_fill)
  np.testing.assert_array_equal(zeroed, _apply(config, variables, X_TINY, skip_scale=jnp.array([0.0, 1.0])))
  assert not np.allclose(out, zeroed, atol=1e-4)


def test_all_skip_masks_in_one_vmapped_call():
  config = models.ModelConfig(residual=True, base_width=4, depth=3)
  x = _images((1, 16, 16, 3))
  variables = _init(config, x)
  masks = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))
  with_skip_scale = jax.jit(lambda scale: _apply(config, variables, x, skip_scale=scale))
  batched = jax.jit(jax.vmap(with_skip_scale))(masks)
  assert batched.shape == (8, 1, 16, 16, 1)
  for mask, out in zip(masks, batched, strict=True):
    np.testing.assert_allclose(out, with_skip_scale(mask), rtol=1e-5, atol=1e-6)
  # The residual shortcuts vmap the same way.
  with_residual_scale = jax.jit(lambda scale: _apply(config, variables, x, residual_scale=scale))
  residual_masks = jnp.eye(7)
  outs = jax.jit(jax.vmap(with_residual_scale))(residual_masks)
  np.testing.assert_allclose(outs[2], with_residual_scale(residual_masks[2]), rtol=1e-5, atol=1e-6)
  # So do the branches, and the skips with a fill (its rows the same vectors each time).
  fills = _fills(config)
  both = jax.jit(
    lambda scale, branch: _apply(config, variables, x, skip_scale=scale, branch_scale=branch, skip_fill=fills)
  )
  outs = jax.jit(jax.vmap(both))(masks[:7], residual_masks)
  np.testing.assert_allclose(outs[3], both(masks[3], residual_masks[3]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'skip_scale': jnp.ones(3)}, r'skip_scale has shape \(3,\); .* shape \(2,\)'),
    ({'residual_scale': jnp.ones(4)}, r'residual_scale has shape \(4,\); .* shape \(5,\)'),
    ({'branch_scale': jnp.ones(6)}, r'branch_scale has shape \(6,\); .* shape \(5,\)'),
    ({'skip_fill': [jnp.ones(4)]}, r'skip_fill has shapes \[\(4,\)\]; .* \[\(4,\), \(8,\)\]'),
    ({'skip_fill': [jnp.ones(4), jnp.ones(4)]}, r'skip_fill has shapes'),
  ],
)
def test_scale_of_wrong_length_is_refused(kwargs, message):
  config = models.ModelConfig(residual=True, **TINY)
  variables = _init(config, X_TINY)
  with pytest.raises(ValueError, match=message):
    _apply(config, variables, X_TINY, **kwargs)


def test_residual_scale_needs_a_residual_model():
  config = models.ModelConfig(**TINY)
  with pytest.raises(ValueError, match='residual=False'):
    _apply(config, _init(config, X_TINY), X_TINY, residual_scale=jnp.ones(5))
  with pytest.raises(ValueError, match='branch_scale was given but the model has residual=False'):
    _apply(config, _init(config, X_TINY), X_TINY, branch_scale=jnp.ones(5))


def test_non_nhwc_input_is_refused():
  config = models.ModelConfig(**TINY)
  with pytest.raises(ValueError, match=r'takes \[B, H, W, C\] images; got shape \(10, 14, 3\)'):
    _init(config, X_TINY[0])


def test_odd_input_size_is_padded_centred_and_cropped():
  config = models.ModelConfig(base_width=2, depth=4, residual=True)
  x = _images((1, 97, 131, 3))
  variables = _init(config, x)
  logits = _apply(config, variables, x)
  assert logits.shape == (1, 97, 131, 1)
  # 97 -> 112 and 131 -> 144: 7 rows above, 8 below, 6 columns left, 7 right.
  padded = jnp.pad(x, ((0, 0), (7, 8), (6, 7), (0, 0)))
  np.testing.assert_allclose(logits, _apply(config, variables, padded)[:, 7:104, 6:137], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(('dtype', 'tolerance'), [('bfloat16', 0.05), ('float16', 0.01)])
def test_low_precision_compute_keeps_float32_logits(dtype, tolerance):
  """bfloat16 keeps 8 bits of mantissa, float16 11: both within their rounding of float32."""
  config = models.ModelConfig(residual=True, norm='group', **TINY)
  variables = _init(config, X_TINY)
  low = jax.jit(lambda v: _apply(config.replace(dtype=dtype), v, X_TINY))(variables)
  full = jax.jit(lambda v: _apply(config, v, X_TINY))(variables)
  assert low.dtype == jnp.float32
  assert not np.array_equal(low, full)  # the convolutions really ran in the low precision
  np.testing.assert_allclose(low, full, atol=tolerance * float(jnp.abs(full).max()))
  low_params = jax.eval_shape(functools.partial(_init, config.replace(param_dtype=dtype)), X_TINY)['params']
  assert {leaf.dtype for leaf in jax.tree.leaves(low_params)} == {jnp.dtype(dtype)}


def test_remat_gives_the_same_output_and_gradients():
  config = models.ModelConfig(residual=True, norm='batch', **TINY)
  variables = _init(config, X_TINY)

  def loss(params, remat):
    model = models.UNet(config.replace(remat=remat))
    logits, _ = model.apply({**variables, 'params': params}, X_TINY, train=True, mutable=['batch_stats'])
    return jnp.mean(logits**2)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = value_and_grad(variables['params'], False)
  value_remat, grads_remat = value_and_grad(variables['params'], True)
  remat_variables = jax.eval_shape(functools.partial(_init, config.replace(remat=True)), X_TINY)
  assert jax.tree.structure(remat_variables) == jax.tree.structure(variables)
  np.testing.assert_allclose(value, value_remat, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads_remat)


def test_the_attention_gate_by_hand():
  """Oktay et al.'s eq. 1-2 on a 2x2 skip and its 1x1 gating signal: W_x (stride 2, no bias)
  reads the top-left pixel, the one-channel map is resampled to every pixel of the skip."""
  gate = models.blocks.AttentionGate(features=1)
  x = jnp.asarray([[[[1.0], [2.0]], [[3.0], [4.0]]]])  # [1, 2, 2, 1]
  g = jnp.asarray([[[[0.5]]]])  # [1, 1, 1, 1]
  params = {
    'W_x': {'kernel': jnp.full((1, 1, 1, 1), 2.0)},
    'W_g': {'kernel': jnp.full((1, 1, 1, 1), -4.0), 'bias': jnp.asarray([0.5])},
    'psi': {'kernel': jnp.full((1, 1, 1, 1), 3.0), 'bias': jnp.asarray([-1.0])},
  }
  assert jax.tree.map(jnp.shape, gate.init(KEY, x, g)['params']) == jax.tree.map(jnp.shape, params)
  q = 3.0 * max(2.0 * 1.0 + (-4.0 * 0.5 + 0.5), 0.0) - 1.0  # psi(relu(W_x x_00 + W_g g + b_g)) = 0.5
  alpha = 1 / (1 + np.exp(-q))
  np.testing.assert_allclose(gate.apply({'params': params}, x, g), np.asarray(x) * alpha, rtol=1e-6)
  np.testing.assert_allclose(gate.apply({'params': params}, x, g, jnp.float32(1)), x)  # opened: the plain skip
  half = alpha + 0.5 * (1 - alpha)
  np.testing.assert_allclose(gate.apply({'params': params}, x, g, jnp.float32(0.5)), np.asarray(x) * half, rtol=1e-6)


def test_an_opened_gate_passes_the_plain_skip_and_zero_scale_still_removes_it():
  config = models.preset('attention_unet', **TINY)
  plain = models.ModelConfig(**TINY)
  variables = _init(config, X_TINY)
  without_gates = {**variables, 'params': {k: v for k, v in variables['params'].items() if not k.startswith('gate_')}}
  opened = _apply(config, variables, X_TINY, gate_open=jnp.ones(2))
  np.testing.assert_allclose(opened, _apply(plain, without_gates, X_TINY), rtol=1e-5, atol=1e-6)
  gated = _apply(config, variables, X_TINY)
  assert np.abs(np.asarray(gated) - np.asarray(opened)).max() > 1e-4  # the gates do something
  removed = _apply(config, variables, X_TINY, skip_scale=jnp.asarray([0.0, 1.0]), gate_open=jnp.asarray([0.0, 1.0]))
  np.testing.assert_allclose(
    removed, _apply(plain, without_gates, X_TINY, skip_scale=jnp.asarray([0.0, 1.0])), rtol=1e-5, atol=1e-6
  )
  both = jax.vmap(lambda o: _apply(config, variables, X_TINY, gate_open=o))(jnp.asarray([[0.0, 0.0], [1.0, 1.0]]))
  np.testing.assert_allclose(both[0], gated, rtol=1e-5, atol=1e-6)  # vmappable like the other knock-outs
  np.testing.assert_allclose(both[1], opened, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="gate_open was given but the model has skip_kind='concat'"):
    _apply(plain, without_gates, X_TINY, gate_open=jnp.ones(2))


def test_bilinear_2x_is_jax_image_resize_at_twice_the_size():
  x = jax.random.normal(KEY, (2, 5, 3, 2))
  expected = jax.image.resize(x, (2, 10, 6, 2), 'bilinear')
  np.testing.assert_allclose(models.blocks.bilinear_2x(x), expected, atol=1e-6)


NESTED = models.preset('unet_plusplus', base_width=4, depth=3, residual=True, norm='batch')


@pytest.mark.parametrize('level', [1, 3])
def test_pruned_unet_plusplus_is_the_sub_network_of_that_depth(level):
  """Zhou et al.'s pruning: the head on X^{0,L} of the trained grid is the UNet++ of depth L on
  the same weights (`prune` extracts it), at any size; the array form selects the same head."""
  x = _images((2, 13, 11, 3))
  variables = _init(NESTED, x)
  pruned = _apply(NESTED, variables, x, prune_level=level)
  sub, sub_variables = models.prune(NESTED, variables, level)
  assert sub.depth == level and sub.deep_supervision
  assert jax.tree.map(jnp.shape, sub_variables) == jax.tree.map(jnp.shape, _init(sub, x))
  np.testing.assert_array_equal(pruned, _apply(sub, sub_variables, x))
  whole = _apply(NESTED, variables, x)
  assert (level == 3) == np.array_equal(pruned, whole)
  square = _images((2, 16, 8, 3))  # a multiple of 2**depth: both forms pad alike
  chosen = jax.jit(lambda L: _apply(NESTED, variables, square, prune_level=L))
  np.testing.assert_allclose(chosen(jnp.int32(level)), _apply(NESTED, variables, square, prune_level=level), atol=1e-6)


def test_every_pruning_level_in_one_vmapped_call_and_the_heads_in_order():
  x = _images((1, 16, 16, 3))
  variables = _init(NESTED, x)
  levels = jax.jit(jax.vmap(lambda L: _apply(NESTED, variables, x, prune_level=L)))(jnp.arange(1, 4))
  heads = _apply(NESTED, variables, x, all_heads=True)  # the deepest sub-network first
  for level, head in zip((3, 2, 1), heads, strict=True):  # float32 sums in another order: 1 ulp-sized
    np.testing.assert_allclose(levels[level - 1], head, rtol=1e-6, atol=1e-6)
  assert not np.allclose(levels[0], levels[2], atol=1e-4)


def test_deep_supervision_heads_on_the_decoder_are_resized_to_the_input():
  config = models.ModelConfig(deep_supervision=True, base_width=4, depth=3)
  variables = _init(config, X_TINY)
  heads = _apply(config, variables, X_TINY, all_heads=True)
  assert [h.shape for h in heads] == [(2, 10, 14, 1)] * 3
  np.testing.assert_array_equal(heads[0], _apply(config, variables, X_TINY))
  seen = {}

  def record(next_fun, args, kwargs, context):  # what each auxiliary head reads
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.name in ('dec_1', 'aux_1'):
      seen[context.module.name] = out
    return out

  with nn.intercept_methods(record):
    _apply(config, variables, X_TINY, all_heads=True)
  assert seen['dec_1'].shape == (2, 8, 8, 8) and seen['aux_1'].shape == (2, 8, 8, 1)  # padded to 16x16, halved
  resized = jax.image.resize(seen['aux_1'], (2, 16, 16, 1), 'bilinear')[:, 3:13, 1:15]
  np.testing.assert_allclose(heads[1], resized, atol=1e-6)


@pytest.mark.parametrize(
  ('config', 'kwargs', 'message'),
  [
    (models.ModelConfig(**TINY), {'prune_level': 1}, "only 'nested' prunes"),
    (models.ModelConfig(skip_kind='nested', **TINY), {'prune_level': 1}, 'needs deep_supervision=True'),
    (models.ModelConfig(skip_kind='nested', **TINY), {'prune_level': jnp.int32(2)}, 'needs deep_supervision=True'),
    (models.preset('unet_plusplus', **TINY), {'prune_level': 3}, r'not a depth of this UNet\+\+; use 1..2'),
    (models.preset('unet_plusplus', **TINY), {'skip_fill': [jnp.ones(4), jnp.ones(8)]}, "skip_kind='nested'"),
  ],
)
def test_pruning_and_fills_are_refused_where_they_mean_nothing(config, kwargs, message):
  variables = _init(config, X_TINY)
  with pytest.raises(ValueError, match=message):
    _apply(config, variables, X_TINY, **kwargs)
