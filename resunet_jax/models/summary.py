"""A text summary of a model: blocks, their parameter counts and the output shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resunet_jax.models.config import ModelConfig
from resunet_jax.models.unet import UNet, block_names, count_params


def summarize(config: ModelConfig, input_shape: tuple[int, int, int, int]) -> str:
  """Describes `UNet(config)` on inputs of `input_shape` without compiling or allocating it.

  Args:
    config: the architecture.
    input_shape: `(B, H, W, C)`.

  Returns:
    A multi-line table: one row per top-level submodule (blocks, gates, heads) with its parameter count, then the
    total, the variable collections and the logits shape.
  """
  model = UNet(config)
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  params = variables['params']
  blocks = [name for name in block_names(config) if name in params]  # execution order
  names = blocks + sorted(set(params) - {*blocks, 'head'}) + ['head']  # then gates and auxiliary heads
  width = max(len(name) for name in names)
  rows = [f'{"module":<{width}}  {"parameters":>12}']
  rows += [f'{name:<{width}}  {count_params(params[name]):>12,}' for name in names]
  rows.append(f'{"total":<{width}}  {count_params(params):>12,}')
  rows.append(f'collections: {", ".join(sorted(variables))}')
  rows.append(f'input {tuple(input_shape)} -> logits {tuple(logits.shape)} {logits.dtype}')
  return '\n'.join(rows)
