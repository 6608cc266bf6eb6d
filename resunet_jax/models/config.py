"""`ModelConfig`, the single source of truth for the U-Net family, and its presets.

Every architectural choice of `resunet_jax.models.UNet` is a field of the frozen, hashable
`ModelConfig`. The defaults are the U-Net of the design note (base width 64, depth 4, two
3x3 'same' convs + ReLU per level, 2x2 max-pool, nearest-neighbour x2 upsampling, concat
skips, no normalisation, biases on, 1x1 head). Presets are named sets of overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp


def _suggest(name: str, valid) -> str:
  """ " (did you mean 'x'?)" for the closest of `valid`, or '' (`errors.suggest`'s rule, kept here:
  `models` imports nothing of the package outside it)."""
  close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
  return f" (did you mean '{close[0]}'?)" if close else ''


NORMS = ('none', 'batch', 'group', 'layer')
UPSAMPLES = ('nearest', 'bilinear', 'transpose')
BLOCKS = ('postact', 'preact')
DOWNSAMPLES = ('maxpool', 'stride')
DTYPES = ('float32', 'bfloat16', 'float16')
INITS = ('lecun', 'glorot', 'he')
SHORTCUTS = ('projection', 'identity')
SKIP_KINDS = ('concat', 'attention', 'nested')
MAX_DEPTH = 8


def unknown_key_error(kind: str, unknown: Sequence[str], valid: Sequence[str]) -> ValueError:
  """A one-line error naming the unknown keys, a close match and every valid key."""
  names = ', '.join(f"'{k}'{_suggest(k, valid)}" for k in sorted(unknown))
  return ValueError(f'unknown {kind} {names}; valid: {", ".join(valid)}')


def _parse_skips(skips: Any, depth: int) -> tuple[bool, ...]:
  """Resolves a `skips` spec to one bool per level (level 0 is the finest resolution)."""
  if isinstance(skips, str):
    if skips == 'all':
      return (True,) * depth
    if skips == 'none':
      return (False,) * depth
    if skips and set(skips) <= {'0', '1'}:
      levels = tuple(c == '1' for c in skips)
    else:
      raise ValueError(
        f"skips={skips!r} is not valid; use 'all', 'none', a string of 0/1 per level "
        f"(level 0 first, e.g. '1011'), or a tuple of {depth} bools"
      )
  elif isinstance(skips, Sequence) and all(isinstance(s, (bool, int)) for s in skips):
    levels = tuple(bool(s) for s in skips)
  else:
    raise ValueError(f"skips={skips!r} is not valid; use 'all', 'none', '0101'-style or bools")
  if len(levels) != depth:
    raise ValueError(f'skips={skips!r} has {len(levels)} entries but depth is {depth}; give one per level')
  return levels


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyperparameters of a U-Net / ResUNet (frozen, hashable, strict).

  Attributes:
    base_width: channels at level 0; level `l` has `base_width * 2**l` channels and the
      bottleneck (bridge) `base_width * 2**depth` (times `width_scale`, rounded).
    depth: number of downsampling steps (encoder levels); the note uses 4, Zhang et al. 3.
    residual: blocks add a shortcut to their conv branch (see `shortcut`).
    shortcut: residual blocks only. 'projection' (the note's ResUNet made buildable): the
      shortcut is a 1x1 convolution `conv_proj` of the block's input where channels or
      resolution change (every block of a U-Net), else the identity. 'identity' (He et al.
      2016, "Identity Mappings in Deep Residual Networks": projection shortcuts train worse
      than identity ones): a 1x1 convolution `conv_in` first maps the input to the block's
      width and resolution, and the shortcut around the two 3x3 convolutions is the identity
      of that; so 'residual_scale' 0 leaves `conv_in` in the path (not the plain block).
    init: kernel initialiser of every convolution in the blocks (biases start at 0): 'lecun'
      (truncated normal, variance 1/fan_in; flax's default), 'glorot' (uniform, variance
      2/(fan_in + fan_out): Keras's `Conv2D` default, which the note's code leaves in place) or
      'he' (truncated normal, variance 2/fan_in: He et al. 2015, "Delving Deep into
      Rectifiers", keeps the activation scale through ReLUs). The linear 1x1 head keeps LeCun.
    skips: which long encoder-to-decoder skip connections exist: 'all', 'none', a string
      of '0'/'1' per level ('1011': level 1 removed; level 0 is the finest), or a tuple of
      `depth` bools. A removed skip removes the concatenation, so the decoder block's input
      channels shrink (static structure; its own parameter tree).
    skip_kind: what a present skip carries into its decoder block. 'concat' (the note): the
      encoder tensor itself. 'attention' (Oktay et al. 2018, "Attention U-Net: Learning Where
      to Look for the Pancreas"): the tensor times an additive attention gate computed from it
      and the coarser decoder tensor (`blocks.AttentionGate`), then concatenated. 'nested'
      (Zhou et al. 2018, "UNet++: A Nested U-Net Architecture for Medical Image
      Segmentation"): the skip becomes a grid of blocks X^{i,j} (level i, column j >= 1), each
      reading the upsampled X^{i+1,j-1} and, as its skip, the concatenation of X^{i,0..j-1};
      X^{i,0} is the encoder and X^{0,depth} feeds the head. Without level i's skip, its nodes
      read the upsampled tensor alone. See `UNet` for the names and `prune`.
    deep_supervision: auxiliary 1x1 heads `aux_k` besides `head` (Lee et al. 2015,
      "Deeply-Supervised Nets"; nnU-Net's default): on the decoder blocks `dec_1 .. dec_{depth-1}`
      (their logits resized bilinearly to the input's size), or for 'nested' on the top row
      X^{0,1} .. X^{0,depth-1} (full size already), whose heads are what a pruned UNet++
      predicts with. Training adds their losses, weighted (`losses.deep_supervision_weights`).
    norm: 'none' | 'batch' | 'group' | 'layer' ('layer' normalises each pixel's channels).
    norm_groups: groups for 'group' norm; a level with fewer channels uses their gcd.
    upsample: 'nearest' | 'bilinear' (parameter-free x2 resize) | 'transpose' (2x2
      stride-2 transposed conv to the level's width, as in the U-Net paper).
    block: 'postact' (conv -> norm -> ReLU, twice; the note) or 'preact' (norm -> ReLU ->
      conv, twice; He et al. 2016, used by Zhang et al. 2018).
    downsample: 'maxpool' (2x2 max-pool before each lower block; the note) or 'stride'
      (stride-2 first conv of each lower block; Zhang et al.).
    num_classes: output channels: 1 for a sigmoid, K for a softmax.
    dtype: compute dtype name; logits are always float32.
    param_dtype: parameter dtype name.
    remat: rematerialise each block in the backward pass (less memory, more compute).
    spatial_dims: 2 (images `[B, H, W, C]`) or 3 (volumes `[B, D, H, W, C]`): every kernel,
      pooling and upsampling has that many axes (3x3x3 convolutions in 3D, as Cicek et al.'s
      3D U-Net, MICCAI 2016).
    pool_strides: per downsampling step (level 1 first), the stride of each spatial axis, 1 or 2;
      empty: 2 on every axis. An axis of stride 1 keeps its size at that level, for voxels much
      coarser along it than across (`pool_strides_for_spacing`: nnU-Net's rule).
    width_scale: every level's width multiplied by this and rounded (at least 1): a control
      matched in parameters to another arm (`matched_width_scale`), e.g. a plain U-Net as large
      as a ResUNet with its projections.

  Which kernels compute the layers is not part of the model: see `UNet.layers`.
  """

  base_width: int = 64
  depth: int = 4
  residual: bool = False
  shortcut: str = 'projection'
  init: str = 'lecun'
  skips: str | tuple[bool, ...] = 'all'
  skip_kind: str = 'concat'
  deep_supervision: bool = False
  norm: str = 'none'
  norm_groups: int = 8
  upsample: str = 'nearest'
  block: str = 'postact'
  downsample: str = 'maxpool'
  num_classes: int = 1
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: bool = False
  spatial_dims: int = 2
  pool_strides: tuple[tuple[int, ...], ...] = ()
  width_scale: float = 1.0

  def __new__(cls, **kwargs: Any) -> ModelConfig:
    # Runs before the dataclass __init__, so a mistyped key gets the valid names.
    unknown = set(kwargs) - set(cls.field_names())
    if unknown:
      raise unknown_key_error('ModelConfig field', sorted(unknown), cls.field_names())
    return super().__new__(cls)

  def __post_init__(self) -> None:
    if isinstance(self.skips, list):  # Keep the config hashable.
      object.__setattr__(self, 'skips', tuple(self.skips))
    if not isinstance(self.pool_strides, tuple) or any(not isinstance(s, tuple) for s in self.pool_strides):
      try:  # lists, from config.json or a config file
        object.__setattr__(self, 'pool_strides', tuple(tuple(int(a) for a in s) for s in self.pool_strides))
      except TypeError:
        raise ValueError(
          f'ModelConfig.pool_strides={self.pool_strides!r} must be one tuple of per-axis strides per level'
        ) from None
    for name in ('base_width', 'depth', 'norm_groups', 'num_classes'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'ModelConfig.{name}={value!r} must be a positive integer')
    if self.depth > MAX_DEPTH:
      raise ValueError(f'ModelConfig.depth={self.depth} is above {MAX_DEPTH}; inputs are padded to 2**depth')
    for name in ('residual', 'remat', 'deep_supervision'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'ModelConfig.{name}={getattr(self, name)!r} must be True or False')
    for name, valid in (
      ('norm', NORMS),
      ('shortcut', SHORTCUTS),
      ('skip_kind', SKIP_KINDS),
      ('init', INITS),
      ('upsample', UPSAMPLES),
      ('block', BLOCKS),
      ('downsample', DOWNSAMPLES),
      ('dtype', DTYPES),
      ('param_dtype', DTYPES),
    ):
      value = getattr(self, name)
      if value not in valid:
        raise ValueError(f'ModelConfig.{name}={value!r}{_suggest(str(value), valid)}; valid: {", ".join(valid)}')
    if self.shortcut != 'projection' and not self.residual:
      raise ValueError(
        f'ModelConfig.shortcut={self.shortcut!r} needs residual=True (a plain block has no shortcut); '
        "leave shortcut='projection' for plain models"
      )
    _parse_skips(self.skips, self.depth)
    if isinstance(self.width_scale, bool) or not isinstance(self.width_scale, (int, float)) or self.width_scale <= 0:
      raise ValueError(f'ModelConfig.width_scale={self.width_scale!r} must be a positive number')
    if self.spatial_dims not in (2, 3) or isinstance(self.spatial_dims, bool):
      raise ValueError(f'ModelConfig.spatial_dims={self.spatial_dims!r} must be 2 (images) or 3 (volumes)')
    if self.pool_strides and (
      len(self.pool_strides) != self.depth
      or any(len(s) != self.spatial_dims or not set(s) <= {1, 2} for s in self.pool_strides)
    ):
      raise ValueError(
        f'ModelConfig.pool_strides={self.pool_strides} needs {self.depth} entries (one per level) of '
        f'{self.spatial_dims} strides each, every one 1 or 2; or () for 2 everywhere'
      )

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    """All field names, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
    """Builds a config from a mapping; unknown keys raise listing the valid ones."""
    return cls(**dict(values))

  def replace(self, **overrides: Any) -> ModelConfig:
    """A copy with `overrides` applied (strict, validated)."""
    return type(self).from_dict({**self.to_dict(), **overrides})

  def to_dict(self) -> dict[str, Any]:
    """Plain dict of the fields (JSON-serialisable)."""
    return dataclasses.asdict(self)

  @property
  def skip_levels(self) -> tuple[bool, ...]:
    """One bool per level, level 0 (finest) first: whether that long skip exists."""
    return _parse_skips(self.skips, self.depth)

  @property
  def strides(self) -> tuple[tuple[int, ...], ...]:
    """Per downsampling step (level 1 first), each spatial axis's stride: `pool_strides` or all 2."""
    return self.pool_strides or ((2,) * self.spatial_dims,) * self.depth

  def multiples(self, depth: int | None = None) -> tuple[int, ...]:
    """Per spatial axis, the total downsampling of the first `depth` levels (default all): inputs
    are padded to multiples of it."""
    total = [1] * self.spatial_dims
    for step in self.strides[: self.depth if depth is None else depth]:
      total = [t * s for t, s in zip(total, step, strict=True)]
    return tuple(total)

  @property
  def planar(self) -> bool:
    """2D with stride 2 on both axes at every level: what every layer set supports."""
    return self.spatial_dims == 2 and set(self.strides) <= {(2, 2)}

  def widths(self) -> tuple[int, ...]:
    """Channels of encoder levels 0..depth-1 followed by the bottleneck."""
    if self.width_scale == 1:
      return tuple(self.base_width * 2**level for level in range(self.depth + 1))
    return tuple(max(1, round(self.base_width * 2**level * self.width_scale)) for level in range(self.depth + 1))

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)


PRESETS: dict[str, dict[str, Any]] = {
  # The design note's U-Net, exactly: 31,378,945 parameters at 128x128x3.
  'unet': {},
  # The note's ResUNet made buildable: 1x1 projections where channels change.
  'resunet': {'residual': True},
  # The note's U-Net with Oktay et al.'s (2018) additive attention gate on each of its 4 skips:
  # 31,902,149 parameters, 523,204 more than 'unet'. A gate on a skip of C channels, gated by the
  # 2C-channel tensor below it, with C/2 intermediate channels: W_x C * C/2 (no bias), W_g
  # 2C * C/2 + C/2, psi C/2 + 1; for C = 64, 128, 256, 512: 6,209 + 24,705 + 98,561 + 393,729.
  # The paper's networks are 3-D with other widths; this keeps the note's 2-D network and adds
  # only the gates, so that 'attention_unet' against 'unet' isolates them.
  'attention_unet': {'skip_kind': 'attention'},
  # Zhou et al.'s UNet++ ("UNet++: A Nested U-Net Architecture for Medical Image Segmentation",
  # DLMIA 2018): backbone widths 32..512 at depth 4, 2x2 transposed-conv upsampling, deep
  # supervision on the top row. 9,042,276 parameters at 3 input channels: at 1 input channel, as
  # the paper's grey-scale images have, and without the three 33-parameter auxiliary heads, it is
  # 9,041,601, the paper's 9.04M (its Table 2), and the same settings without the nested nodes give
  # 7,759,521, its U-Net's 7.76M. The paper's dropout is left out (it has no parameters).
  # Blocks X^{i,j}: two 3x3 convs from (j * w_i + w_i) channels (a transposed conv `up` of w_{i+1}
  # to w_i first, then the j same-level tensors) to w_i, for w_i = 32 * 2**i.
  'unet_plusplus': {'skip_kind': 'nested', 'base_width': 32, 'upsample': 'transpose', 'deep_supervision': True},
  # Zhang, Liu & Wang, "Road Extraction by Deep Residual U-Net", IEEE GRSL 2018.
  'resunet_zhang': {
    'residual': True,
    'depth': 3,
    'norm': 'batch',
    'block': 'preact',
    'downsample': 'stride',
  },
}


def pool_strides_for_spacing(spacing: Sequence[float], depth: int) -> tuple[tuple[int, ...], ...]:
  """`ModelConfig.pool_strides` for voxels of `spacing` (one size per spatial axis): nnU-Net's rule.

  At each downsampling step an axis is pooled (stride 2) unless its current spacing is more
  than twice the finest current spacing; pooling doubles an axis's spacing. So a volume of
  3 x 0.8 x 0.8 mm keeps its slices at the first level and pools all axes once the in-plane
  spacing has caught up (Isensee et al., Nature Methods 2021, "Network topology").
  """
  current = [float(s) for s in spacing]
  if not current or min(current) <= 0:
    raise ValueError(f'spacing {list(spacing)} must give one positive size per spatial axis')
  steps = []
  for _ in range(depth):
    finest = min(current)
    step = tuple(1 if size > 2 * finest else 2 for size in current)
    current = [size * s for size, s in zip(current, step, strict=True)]
    steps.append(step)
  return tuple(steps)


def preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named preset's `ModelConfig` with `overrides` applied.

  Args:
    name: one of `PRESETS` ('unet', 'resunet', 'attention_unet', 'unet_plusplus', 'resunet_zhang').
    **overrides: `ModelConfig` fields that win over the preset's values.

  Returns:
    The validated `ModelConfig`.

  Raises:
    ValueError: unknown preset (the message lists them) or unknown/invalid field.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown model preset '{name}'{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
  return ModelConfig.from_dict({**PRESETS[name], **overrides})
