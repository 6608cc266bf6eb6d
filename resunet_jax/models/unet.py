"""The U-Net family as one linen module, `UNet(config)`.

Layout, for `depth = D` and widths `w_l = base_width * 2**l`:

  enc_0 .. enc_{D-1}   encoder blocks; each output is the skip tensor of its level
  bottleneck           block at width w_D, resolution / 2**D
  dec_{D-1} .. dec_0   x2 upsample (a transposed conv `dec_l/up` when 'transpose'), concat [up, skip_l], block
  head                 1x1 conv to `num_classes` float32 logits

Parameter counts (input channels 3, `num_classes=1`): the note's U-Net is
  encoder   1,792 + 36,928 + 73,856 + 147,584 + 295,168 + 590,080 + 1,180,160 + 2,359,808
  bottleneck 4,719,616 + 9,438,208
  decoder   (1536->512) 7,078,400 + 2,359,808 + (768->256) 1,769,728 + 590,080
            + (384->128) 442,496 + 147,584 + (192->64) 110,656 + 36,928
  head      65
  total     31,378,945
(a 3x3 conv from i to o channels has 9*i*o + o parameters). The ResUNet adds a 1x1
`conv_proj` (i*o + o) to each of its 9 blocks, since every block changes its channel count:
3->64, 64->128, 128->256, 256->512, 512->1024, 1536->512, 768->256, 384->128, 192->64:
1,743,936 more, 33,122,881 in all. With `shortcut='identity'` each block instead starts with a
1x1 `conv_in` (i*o + o) and its `conv1` reads o channels (9*o*o + o): 33,158,017 in all.

`resunet_zhang` (Zhang, Liu & Wang, IEEE GRSL 2018, Table I) has 8,220,993 parameters
(at any input size; pinned at 224x224x3 in the tests); the paper reports 7.8M. The seven 1x1
projection shortcuts (3->64, 64->128, 128->256, 256->512, 768->256, 384->128, 192->64, with
biases) hold 431,680 of them, and 8,220,993 - 431,680 = 7,789,313 ~ 7.8M: the paper's figure
matches the network without its projections, which it needs wherever a unit changes shape
(every unit here), so we keep them. BatchNorm scale and offset are counted; its running
statistics live in `batch_stats` and are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resunet_jax.models import blocks
from resunet_jax.models import layers as layers_lib
from resunet_jax.models.config import ModelConfig


def block_names(config: ModelConfig) -> tuple[str, ...]:
  """Names of the network's blocks in execution order; `residual_scale` follows this order.

  Returns:
    `('enc_0', ..., 'enc_{D-1}', 'bottleneck', 'dec_{D-1}', ..., 'dec_0')`, `2 * depth + 1` names.
  """
  encoder = tuple(f'enc_{level}' for level in range(config.depth))
  decoder = tuple(f'dec_{level}' for level in reversed(range(config.depth)))
  return encoder + ('bottleneck',) + decoder


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))


def _check_scale(name: str, scale, length: int, what: str) -> jax.Array | None:
  if scale is None:
    return None
  scale = jnp.asarray(scale, jnp.float32)
  if scale.shape != (length,):
    raise ValueError(f'{name} has shape {scale.shape}; it needs one multiplier per {what}: shape ({length},)')
  return scale


def _pad_to_multiple(x: jax.Array, multiple: int) -> tuple[jax.Array, tuple[int, int, int, int]]:
  """Zero-pads H and W (centred) up to a multiple; returns the padded array and the crop box.

  The padded size is written as `multiple * ceil(size / multiple)` so that it stays a known
  multiple for symbolic H and W (`jax.export` with shapes such as 'b, h, w'), where `-h % m`
  would not let the decoder's concatenations prove that their sizes agree.
  """
  _, height, width, _ = x.shape
  pad_h = (height + multiple - 1) // multiple * multiple - height
  pad_w = (width + multiple - 1) // multiple * multiple - width
  top, left = pad_h // 2, pad_w // 2
  x = jnp.pad(x, ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0)))  # a no-op when both are 0
  return x, (top, left, height, width)


class UNet(nn.Module):
  """U-Net / ResUNet for dense prediction, configured by a `ModelConfig`.

  Attributes:
    config: the architecture (see `ModelConfig`).
    axis_name: mapped axis over which BatchNorm syncs statistics under pmap/shard_map;
      leave None under jit.
    layers: where every layer comes from (`models.layers`): `STOCK`, Flax's and lax's, or a
      set with the same parameters and values (`resunet_jax.cpu.layers()` on XLA's CPU backend).
  """

  config: ModelConfig
  axis_name: str | None = None
  layers: layers_lib.Layers = layers_lib.STOCK

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    train: bool,
    skip_scale: jax.Array | None = None,
    residual_scale: jax.Array | None = None,
    branch_scale: jax.Array | None = None,
    skip_fill: Sequence[jax.Array] | None = None,
    gate_open: jax.Array | None = None,
  ) -> jax.Array:
    """Maps images to per-pixel logits.

    Args:
      x: `[B, H, W, C_in]` float images, any H and W (padded to a multiple of 2**depth
        inside, logits cropped back).
      train: BatchNorm uses batch statistics and updates `batch_stats` when True.
      skip_scale: `[depth]` multipliers on the skip tensors before concatenation, level 0
        first (apply-time knock-out: 0 removes a skip's contribution). Entries of levels
        whose skip is absent from the config are ignored. None means all ones. A zero
        equals the network built without that skip, given the same weights minus the skip's
        input-channel slice of the decoder block's `conv1` (and `conv_proj`), except for
        residual models with 'transpose' upsampling: there the skip-less block's input width
        equals its output width, so it has an identity shortcut where this one projects.
      residual_scale: `[2 * depth + 1]` multipliers on each block's shortcut, in
        `block_names` order. Only for `residual=True`. None means all ones.
      branch_scale: `[2 * depth + 1]` multipliers on each block's residual branch (its
        convolutions), in `block_names` order: 0 deletes the branch and keeps the shortcut,
        the lesion of Veit et al. (NeurIPS 2016). Only for `residual=True`. None means all ones.
      skip_fill: None, or one `[C_level]` vector per level (level 0 first, the skip's
        channels): what `skip_scale` scales towards. The decoder then reads
        `s * skip + (1 - s) * fill` (broadcast over batch and pixels), so a 0 replaces the skip
        by the fill, e.g. its mean over the training set (a mean-ablation), instead of by zeros.
      gate_open: `[depth]` values in [0, 1], level 0 first, for `skip_kind='attention'`: each
        level's attention gate becomes `alpha + open * (1 - alpha)`, so 1 replaces the gate by
        ones and passes the plain skip (the gate's knock-out, on the trained weights). None
        means all zeros (the gates as trained). `skip_scale` then scales the gated skip.

    Returns:
      logits: `[B, H, W, num_classes]` float32.
    """
    cfg = self.config
    if x.ndim != 4:
      raise ValueError(f'UNet expects NHWC images [B, H, W, C]; got shape {x.shape}')
    skip_scale = _check_scale('skip_scale', skip_scale, cfg.depth, 'level')
    if gate_open is not None and cfg.skip_kind != 'attention':
      raise ValueError(f'gate_open was given but the model has skip_kind={cfg.skip_kind!r} (no gates to open)')
    gate_open = _check_scale('gate_open', gate_open, cfg.depth, 'level')
    names = block_names(cfg)
    if residual_scale is not None and not cfg.residual:
      raise ValueError('residual_scale was given but the model has residual=False (no shortcuts to scale)')
    residual_scale = _check_scale('residual_scale', residual_scale, len(names), 'block')
    if branch_scale is not None and not cfg.residual:
      raise ValueError('branch_scale was given but the model has residual=False (no branch beside a shortcut)')
    branch_scale = _check_scale('branch_scale', branch_scale, len(names), 'block')
    widths = cfg.widths()
    if skip_fill is not None:
      shapes = [tuple(jnp.shape(fill)) for fill in skip_fill]
      if shapes != [(widths[level],) for level in range(cfg.depth)]:
        raise ValueError(
          f'skip_fill has shapes {shapes}; it needs one vector per level of the skip widths '
          f'{[(widths[level],) for level in range(cfg.depth)]}'
        )

    block_cls = nn.remat(blocks.ConvBlock, static_argnums=(2,)) if cfg.remat else blocks.ConvBlock
    stride_down = cfg.downsample == 'stride'

    def block(h, index, features, stride=1, upsample=None, skip=None):
      module = block_cls(
        features=features,
        residual=cfg.residual,
        shortcut=cfg.shortcut,
        initializer=cfg.init,
        preact=cfg.block == 'preact',
        first=index == 0,
        stride=stride,
        norm=cfg.norm,
        norm_groups=cfg.norm_groups,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        axis_name=self.axis_name,
        upsample=upsample,
        layers=self.layers,
        name=names[index],
      )
      residual = None if residual_scale is None else residual_scale[index]
      return module(h, train, residual, skip, None if branch_scale is None else branch_scale[index])

    h, (top, left, height, width) = _pad_to_multiple(x.astype(cfg.compute_dtype), 2**cfg.depth)
    skips = []
    for level in range(cfg.depth + 1):
      if level > 0 and not stride_down:
        h = self.layers.max_pool(h)
      h = block(h, level, widths[level], stride=2 if level > 0 and stride_down else 1)
      skips.append(h)
    skips.pop()  # The bottleneck's output feeds the decoder, not a skip.

    for index, level in enumerate(reversed(range(cfg.depth)), start=cfg.depth + 1):
      skip = skips[level] if cfg.skip_levels[level] else None
      if skip is not None and cfg.skip_kind == 'attention':
        gate = blocks.AttentionGate(
          features=max(1, widths[level] // 2),
          initializer=cfg.init,
          dtype=cfg.compute_dtype,
          param_dtype=cfg.params_dtype,
          layers=self.layers,
          name=f'gate_{level}',
        )
        skip = gate(skip, h, None if gate_open is None else gate_open[level])
      if skip is not None and skip_scale is not None:
        scale = skip_scale[level].astype(skip.dtype)
        skip = skip * scale
        if skip_fill is not None:
          skip = skip + (1 - scale) * jnp.asarray(skip_fill[level], skip.dtype)
      h = block(h, index, widths[level], upsample=cfg.upsample, skip=skip)

    logits = self.layers.conv(cfg.num_classes, (1, 1), dtype=jnp.float32, param_dtype=cfg.params_dtype, name='head')(
      h.astype(jnp.float32)
    )
    return logits[:, top : top + height, left : left + width, :]
