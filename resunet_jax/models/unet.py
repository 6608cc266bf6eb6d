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


def nested_nodes(depth: int) -> tuple[tuple[int, int], ...]:
  """The (level, column) pairs of a UNet++ grid's decoder nodes X^{i,j}, j >= 1, in the order
  `UNet` computes them: diagonal by diagonal (`i + j = 1, .., depth`, each after the encoder
  block X^{i+j,0}), each from its coarsest node up, so that the nodes of the sub-network of
  depth L come first."""
  return tuple((total - column, column) for total in range(1, depth + 1) for column in range(1, total + 1))


def block_names(config: ModelConfig) -> tuple[str, ...]:
  """Names of the network's blocks; `residual_scale` and `branch_scale` follow this order.

  Returns:
    `('enc_0', ..., 'enc_{D-1}', 'bottleneck', 'dec_{D-1}', ..., 'dec_0')`, `2 * depth + 1` names;
    for `skip_kind='nested'` the encoder and bottleneck, then `x_{i}_{j}` (the node X^{i,j}) in
    `nested_nodes` order, `depth + 1 + depth * (depth + 1) / 2` names.
  """
  encoder = tuple(f'enc_{level}' for level in range(config.depth))
  if config.skip_kind == 'nested':
    return encoder + ('bottleneck',) + tuple(f'x_{i}_{j}' for i, j in nested_nodes(config.depth))
  decoder = tuple(f'dec_{level}' for level in reversed(range(config.depth)))
  return encoder + ('bottleneck',) + decoder


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))


def param_count(config: ModelConfig, in_channels: int = 3) -> int:
  """Parameters of `UNet(config)` for `in_channels` input channels (shapes only: nothing is computed)."""
  size = tuple(config.multiples())
  x = jax.ShapeDtypeStruct((1, *size, in_channels), jnp.float32)
  variables = jax.eval_shape(lambda x: UNet(config).init(jax.random.key(0), x, train=False), x)
  return count_params(variables['params'])


def matched_width_scale(config: ModelConfig, target: int, in_channels: int = 3, tolerance: float = 0.02) -> float:
  """The `width_scale` that gives `config` the parameter count nearest `target` (e.g. a plain arm's
  control matched to the residual arm, `param_count(residual)`), to 3 decimals.

  Raises:
    ValueError: no scale in [1/8, 8] comes within `tolerance` (relative) of `target`.
  """
  low, high = 0.125, 8.0
  for _ in range(40):  # the count grows with the scale, in steps where a width rounds up
    middle = (low + high) / 2
    if param_count(config.replace(width_scale=middle), in_channels) < target:
      low = middle
    else:
      high = middle
  counts = {
    scale: param_count(config.replace(width_scale=scale), in_channels) for scale in {round(low, 3), round(high, 3)}
  }
  best = min(counts, key=lambda scale: abs(counts[scale] - target))
  found = counts[best]
  if abs(found - target) > tolerance * target:
    raise ValueError(
      f'no width_scale gives {target:,} parameters within {tolerance:.0%}: the nearest, {best}, gives {found:,}'
    )
  return best


def _check_scale(name: str, scale, length: int, what: str) -> jax.Array | None:
  if scale is None:
    return None
  scale = jnp.asarray(scale, jnp.float32)
  if scale.shape != (length,):
    raise ValueError(f'{name} has shape {scale.shape}; it needs one multiplier per {what}: shape ({length},)')
  return scale


def _pad_to_multiple(x: jax.Array, multiples: Sequence[int]) -> tuple[jax.Array, tuple[slice, ...]]:
  """Zero-pads each spatial axis (centred) up to a multiple of its entry of `multiples`; returns
  the padded array and the index that crops it back.

  The padded size is written as `multiple * ceil(size / multiple)` so that it stays a known
  multiple for symbolic H and W (`jax.export` with shapes such as 'b, h, w'), where `-h % m`
  would not let the decoder's concatenations prove that their sizes agree.
  """
  pads, crop = [(0, 0)], [slice(None)]
  for size, multiple in zip(x.shape[1:-1], multiples, strict=True):
    pad = (size + multiple - 1) // multiple * multiple - size
    pads.append((pad // 2, pad - pad // 2))
    crop.append(slice(pad // 2, pad // 2 + size))
  x = jnp.pad(x, (*pads, (0, 0)))  # a no-op when nothing is padded
  return x, (*crop, slice(None))


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
    prune_level: int | jax.Array | None = None,
    all_heads: bool = False,
  ) -> jax.Array | tuple[jax.Array, ...]:
    """Maps images to per-pixel logits.

    Args:
      x: `[B, H, W, C_in]` float images, any H and W (padded to a multiple of 2**depth
        inside, logits cropped back); `[B, D, H, W, C_in]` volumes for `spatial_dims=3`.
      train: BatchNorm uses batch statistics and updates `batch_stats` when True.
      skip_scale: `[depth]` multipliers on the skip tensors before concatenation, level 0
        first (apply-time knock-out: 0 removes a skip's contribution; for 'nested' it scales
        everything a level's nodes read from their own level). Entries of levels whose skip is
        absent from the config are ignored. None means all ones. A zero equals the network
        built without that skip, given the same weights minus the skip's input-channel slice of
        the decoder block's `conv1` (and `conv_proj`), except for residual models with
        'transpose' upsampling: there the skip-less block's input width equals its output
        width, so it has an identity shortcut where this one projects.
      residual_scale: `[len(block_names)]` multipliers on each block's shortcut, in
        `block_names` order. Only for `residual=True`. None means all ones.
      branch_scale: `[len(block_names)]` multipliers on each block's residual branch (its
        convolutions), in `block_names` order: 0 deletes the branch and keeps the shortcut,
        the lesion of Veit et al. (NeurIPS 2016). Only for `residual=True`. None means all ones.
      skip_fill: None, or one `[C_level]` vector per level (level 0 first, the skip's
        channels): what `skip_scale` scales towards. The decoder then reads
        `s * skip + (1 - s) * fill` (broadcast over batch and pixels), so a 0 replaces the skip
        by the fill, e.g. its mean over the training set (a mean-ablation), instead of by zeros.
        Not for 'nested', whose skips are not the encoder's tensors alone.
      gate_open: `[depth]` values in [0, 1], level 0 first, for `skip_kind='attention'`: each
        level's attention gate becomes `alpha + open * (1 - alpha)`, so 1 replaces the gate by
        ones and passes the plain skip (the gate's knock-out, on the trained weights). None
        means all zeros (the gates as trained). `skip_scale` then scales the gated skip.
      prune_level: 'nested' only: predict with the sub-network of depth L in 1..depth (the
        head on X^{0,L}; Zhou et al.'s pruned UNet++), which below `depth` needs
        `deep_supervision`. A Python int computes that sub-network alone (the inference
        speed-up, padding to a multiple of 2**L only: `prune` extracts it as a model of its own,
        with equal logits); an integer array computes every head and selects one, so it can be
        vmapped (equal to the int where H and W are multiples of 2**depth, since it pads for
        the whole network). None means `depth`.
      all_heads: return every head's logits, the main one first (training with
        `deep_supervision`): `(head, aux_1, ..., aux_{depth-1})` on the decoder, or for 'nested'
        `(head, aux_{L-1}, ..., aux_1)`, the deepest sub-network first. Without
        `deep_supervision`, or with an array `prune_level`, a 1-tuple. Otherwise the auxiliary
        heads are not computed.

    Returns:
      logits: `[B, H, W, num_classes]` float32 (`[B, D, H, W, num_classes]` for volumes), or a
      tuple of them (`all_heads`).
    """
    cfg = self.config
    if x.ndim != cfg.spatial_dims + 2:
      layout = '[B, H, W, C] images' if cfg.spatial_dims == 2 else '[B, D, H, W, C] volumes'
      raise ValueError(f'this UNet (spatial_dims={cfg.spatial_dims}) takes {layout}; got shape {x.shape}')
    nested = cfg.skip_kind == 'nested'
    skip_scale = _check_scale('skip_scale', skip_scale, cfg.depth, 'level')
    if gate_open is not None and cfg.skip_kind != 'attention':
      raise ValueError(f'gate_open was given but the model has skip_kind={cfg.skip_kind!r} (no gates to open)')
    gate_open = _check_scale('gate_open', gate_open, cfg.depth, 'level')
    static_prune = _check_prune(cfg, prune_level)
    names = block_names(cfg)
    if residual_scale is not None and not cfg.residual:
      raise ValueError('residual_scale was given but the model has residual=False (no shortcuts to scale)')
    residual_scale = _check_scale('residual_scale', residual_scale, len(names), 'block')
    if branch_scale is not None and not cfg.residual:
      raise ValueError('branch_scale was given but the model has residual=False (no branch beside a shortcut)')
    branch_scale = _check_scale('branch_scale', branch_scale, len(names), 'block')
    widths = cfg.widths()
    if skip_fill is not None:
      if nested:
        raise ValueError("skip_fill was given but the model has skip_kind='nested' (its skips are not the encoder's)")
      shapes = [tuple(jnp.shape(fill)) for fill in skip_fill]
      if shapes != [(widths[level],) for level in range(cfg.depth)]:
        raise ValueError(
          f'skip_fill has shapes {shapes}; it needs one vector per level of the skip widths '
          f'{[(widths[level],) for level in range(cfg.depth)]}'
        )

    block_cls = nn.remat(blocks.ConvBlock, static_argnums=(2,)) if cfg.remat else blocks.ConvBlock
    stride_down = cfg.downsample == 'stride'
    index_of = {name: index for index, name in enumerate(names)}

    def block(h, name, features, stride=1, upsample=None, skip=None, factors=None):
      index = index_of[name]
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
        factors=None if factors is None or cfg.planar else factors,  # planar: the module as it was
        layers=self.layers,
        name=name,
      )
      residual = None if residual_scale is None else residual_scale[index]
      return module(h, train, residual, skip, None if branch_scale is None else branch_scale[index])

    def encoder(h, level):
      if level > 0 and not stride_down:
        h = self.layers.max_pool(h) if cfg.planar else self.layers.max_pool(h, cfg.strides[level - 1])
      name = 'bottleneck' if level == cfg.depth else f'enc_{level}'
      return block(h, name, widths[level], stride=cfg.strides[level - 1] if level > 0 and stride_down else 1)

    def scaled(skip, level):
      if skip is None or skip_scale is None:
        return skip
      scale = skip_scale[level].astype(skip.dtype)
      if skip_fill is None:
        return skip * scale
      return skip * scale + (1 - scale) * jnp.asarray(skip_fill[level], skip.dtype)

    def head(h, name):
      conv = self.layers.conv(
        cfg.num_classes, (1,) * cfg.spatial_dims, dtype=jnp.float32, param_dtype=cfg.params_dtype, name=name
      )
      return conv(h.astype(jnp.float32))

    upto = cfg.depth if static_prune is None else static_prune  # the depth computed
    # Auxiliary heads only where something reads them (init creates their parameters): an export
    # or an inference call traces the main head alone.
    chosen = prune_level is not None and static_prune is None
    auxiliary = cfg.deep_supervision and (all_heads or chosen or self.is_initializing())
    h, crop = _pad_to_multiple(x.astype(cfg.compute_dtype), cfg.multiples(upto))
    if nested:
      # X^{i,0} is the encoder; X^{i,j} reads up(X^{i+1,j-1}) and [X^{i,0}, ..., X^{i,j-1}].
      grid = {}
      for total in range(upto + 1):
        h = grid[total, 0] = encoder(h, total)
        for column in range(1, total + 1):
          level = total - column
          same = [grid[level, c] for c in range(column)]
          skip = scaled(jnp.concatenate(same, axis=-1), level) if cfg.skip_levels[level] else None
          grid[level, column] = block(
            grid[level + 1, column - 1],
            f'x_{level}_{column}',
            widths[level],
            upsample=cfg.upsample,
            skip=skip,
            factors=cfg.strides[level],
          )
      columns = range(1, upto + 1) if auxiliary else (upto,)
      logits = {c: head(grid[0, c], 'head' if c == cfg.depth else f'aux_{c}') for c in columns}
      if chosen:  # an array: every head, then one chosen
        outputs = (jnp.take(jnp.stack([logits[c] for c in columns]), jnp.asarray(prune_level) - 1, axis=0),)
      else:
        outputs = tuple(logits[c] for c in sorted(logits, reverse=True))
    else:
      skips = []
      for level in range(cfg.depth + 1):
        h = encoder(h, level)
        skips.append(h)
      decoder = {}
      for level in reversed(range(cfg.depth)):
        skip = skips[level] if cfg.skip_levels[level] else None
        if skip is not None and cfg.skip_kind == 'attention':
          gate = blocks.AttentionGate(
            features=max(1, widths[level] // 2),
            initializer=cfg.init,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            layers=self.layers,
            factors=None if cfg.planar else cfg.strides[level],
            name=f'gate_{level}',
          )
          skip = gate(skip, h, None if gate_open is None else gate_open[level])
        h = decoder[level] = block(
          h, f'dec_{level}', widths[level], upsample=cfg.upsample, skip=scaled(skip, level), factors=cfg.strides[level]
        )
      outputs = (head(h, 'head'),)
      if auxiliary:
        padded = (h.shape[0], *decoder[0].shape[1:-1], cfg.num_classes)
        outputs += tuple(
          jax.image.resize(head(decoder[level], f'aux_{level}'), padded, 'bilinear') for level in range(1, cfg.depth)
        )
    outputs = tuple(logits[crop] for logits in outputs)
    return outputs if all_heads else outputs[0]


def _check_prune(config: ModelConfig, level) -> int | None:
  """Validates `UNet(prune_level=)`; returns it if it is a Python int (a static pruning)."""
  if level is None:
    return None
  if config.skip_kind != 'nested':
    raise ValueError(f"prune_level was given but the model has skip_kind={config.skip_kind!r}; only 'nested' prunes")
  static = isinstance(level, int) and not isinstance(level, bool)
  if static and not 1 <= level <= config.depth:
    raise ValueError(f'prune_level={level} is not a depth of this UNet++; use 1..{config.depth}')
  if not config.deep_supervision and not (static and level == config.depth):
    raise ValueError(
      'prune_level below the depth needs deep_supervision=True: only then is there a trained head on X^{0,L}'
    )
  return level if static else None


def prune(config: ModelConfig, variables: dict, level: int) -> tuple[ModelConfig, dict]:
  """The UNet++ sub-network of depth `level` as a model of its own (Zhou et al. 2018, sec. 2: a
  deeply supervised UNet++ pruned at inference).

  Args:
    config: a 'nested' `ModelConfig` with `deep_supervision` (unless `level == depth`).
    variables: its variables (`params`, and `batch_stats` if it has any).
    level: the depth L of the sub-network, 1..depth.

  Returns:
    `(config with depth=L and the first L skips, variables)`: X^{L,0} becomes `bottleneck`,
    `aux_L` becomes `head`, and what the sub-network does not use is dropped, so that
    `UNet(pruned).apply(pruned_variables, x)` equals `UNet(config).apply(variables, x, prune_level=L)`.
  """
  _check_prune(config, level)
  sub = config.replace(depth=level, skips=config.skip_levels[:level], pool_strides=config.pool_strides[:level])
  renames = {f'enc_{level}': 'bottleneck', f'aux_{level}': 'head'} if level < config.depth else {}
  keep = set(block_names(sub)) | {'head'}
  if sub.deep_supervision:
    keep |= {f'aux_{column}' for column in range(1, level)}
  dropped = ('head', 'bottleneck') if level < config.depth else ()

  def select(tree):
    renamed = {renames.get(name, name): value for name, value in tree.items() if name not in dropped}
    return {name: value for name, value in renamed.items() if name in keep}

  return sub, {collection: select(tree) for collection, tree in variables.items()}
