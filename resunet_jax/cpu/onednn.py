"""oneDNN convolutions for XLA's CPU backend, called through `jax.ffi`.

XLA's CPU backend lowers convolutions to Eigen's; on the 2-core AVX-512 machine this project is
measured on they run at 0.37-0.78 of oneDNN's speed (PyTorch's CPU convolutions), the kernel
gradients worst (benchmarks/README.md, "Where the time goes"). This module binds oneDNN's own
convolution primitives (forward, backward-data, backward-weights) as XLA FFI custom calls:

  conv_general_dilated(lhs, rhs, ...)   a drop-in for `lax.conv_general_dilated` (what flax's
                                        `nn.Conv(conv_general_dilated=...)` takes)
  conv_bias_relu(x, w, b, ...)          `relu(conv(x, w) + b)` as one oneDNN primitive (ConvReLU)
  conv_bias_add(x, w, b, z, ...)        `conv(x, w) + b + z`, optionally then ReLU, as one primitive

Only what it supports goes to oneDNN: float32, 2-D, NHWC/HWIO, any stride and padding, no
dilation or grouping. Anything else, and every platform other than CPU (the lowering is chosen
per platform), uses XLA's own convolution. Results match XLA's to float32 rounding (~1e-6
relative), not bit for bit.

Their gradients are custom (reverse mode only): forward-mode transformations raise
`ForwardModeError`, which names the stock backend.

The handlers (onednn_conv.cc, next to this file) are compiled on first use with the C++
compiler (`$CXX`, else g++) against the oneDNN wheels `onednn-cpu-gomp` and
`onednn-devel-cpu-gomp` (oneDNN 3.2, GNU OpenMP; `pip install -e '.[cpu]'`), into
`$RESUNET_JAX_CACHE` (default ~/.cache/resunet_jax); about 5 s, once per machine and source version.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad

from resunet_jax.cpu import native
from resunet_jax.errors import UserError

SOURCE = pathlib.Path(__file__).with_name('onednn_conv.cc')
_TARGETS = ('ConvForward', 'ConvForwardBiasRelu', 'ConvForwardBiasSum', 'ConvBackwardData', 'ConvBackwardWeights')
_NHWC = ('NHWC', 'HWIO', 'NHWC')
_INSTALL = "pip install -e '.[cpu]' (Linux x86-64), or use runtime.backend='stock'"
_FORWARD_MODE = (
  "the CPU backend's layers (oneDNN convolutions, custom pooling gradients) are reverse-mode only; for jvp, "
  "jacfwd, linearize or Hessian-vector products use the stock layers (models.STOCK, runtime.backend='stock')"
)


class OneDNNUnavailable(UserError):
  """oneDNN convolutions were asked for but cannot be built or loaded here."""


class OneDNNNotInstalled(OneDNNUnavailable):
  """The oneDNN wheels are not installed (the `cpu` extra, Linux x86-64 only)."""


class ForwardModeError(TypeError):
  """A forward-mode transformation met a reverse-only layer of the CPU backend."""


def reverse_only(function):
  """`function` (which has a custom VJP) raising `ForwardModeError` under forward-mode autodiff.

  Under `jvp` (eager or jitted) the operands are JVP tracers; eagerly, JAX's own refusal is
  raised inside the call. Both become the one-line error naming the stock layers.
  """

  @functools.wraps(function)
  def wrapped(*args, **kwargs):
    if any(isinstance(leaf, ad.JVPTracer) for leaf in jax.tree.leaves((args, kwargs))):
      raise ForwardModeError(_FORWARD_MODE)
    try:
      return function(*args, **kwargs)
    except TypeError as e:
      if 'forward-mode' in str(e):
        raise ForwardModeError(_FORWARD_MODE) from None
      raise

  return wrapped


def _wheel_file(distribution: str, name: str) -> pathlib.Path:
  try:
    files = importlib.metadata.files(distribution) or []
  except importlib.metadata.PackageNotFoundError:
    raise OneDNNNotInstalled(f'oneDNN convolutions need the {distribution} package: {_INSTALL}') from None
  for file in files:
    if file.name == name:
      return pathlib.Path(file.locate()).resolve()
  raise OneDNNUnavailable(f'{distribution} is installed but holds no {name}; reinstall it: {_INSTALL}')


def build() -> pathlib.Path:
  """Compiles onednn_conv.cc if this source, oneDNN and jaxlib have no library yet; returns its path.

  `RESUNET_ONEDNN_CXXFLAGS` adds compiler flags (a sanitiser build: benchmarks/README.md).
  """
  library = _wheel_file('onednn-cpu-gomp', 'libdnnl.so.3')
  header = _wheel_file('onednn-devel-cpu-gomp', 'dnnl.hpp')
  include = header.parent.parent if header.parent.name == 'dnnl' else header.parent
  flags = ['-std=c++17', f'-I{include}', f'-I{jax.ffi.include_dir()}', str(library), f'-Wl,-rpath,{library.parent}']
  # e.g. '-fsanitize=address,undefined -g' for a sanitised build (a library of its own in the cache)
  flags += os.environ.get('RESUNET_ONEDNN_CXXFLAGS', '').split()
  depends_on = str(library).encode() + importlib.metadata.version('jaxlib').encode()
  try:
    return native.compile_library(SOURCE, os.environ.get('CXX') or 'g++', flags, depends_on)
  except native.BuildError as e:
    raise OneDNNUnavailable(str(e)) from None


@functools.cache
def load() -> None:
  """Builds (if needed) and registers the handlers with XLA; raises `OneDNNUnavailable`."""
  path = build()
  # libdnnl first, globally, so that our library's dependency on it resolves to the wheel's copy.
  ctypes.CDLL(str(_wheel_file('onednn-cpu-gomp', 'libdnnl.so.3')), mode=ctypes.RTLD_GLOBAL)
  handlers = ctypes.CDLL(str(path))
  for name in _TARGETS:
    jax.ffi.register_ffi_target(f'resunet_onednn_{name}', jax.ffi.pycapsule(getattr(handlers, name)), platform='cpu')


def installed() -> bool:
  """Whether the `cpu` extra's oneDNN wheels are installed (they may still fail to build or load)."""
  try:
    _wheel_file('onednn-cpu-gomp', 'libdnnl.so.3')
    _wheel_file('onednn-devel-cpu-gomp', 'dnnl.hpp')
  except OneDNNUnavailable:
    return False
  return True


@functools.cache
def available() -> bool:
  """Whether oneDNN convolutions can be used here (logs why not, once)."""
  try:
    load()
  except OneDNNUnavailable as e:
    # Without the wheels (not Linux x86-64) XLA's are the expected path; a failed build is not.
    level = logging.INFO if isinstance(e, OneDNNNotInstalled) else logging.WARNING
    logging.log(level, 'Using XLA convolutions (2x slower on CPU): %s', e)
    return False
  return True


def _attrs(strides, pads) -> dict:
  (top, bottom), (left, right) = pads
  values = dict(
    stride_h=strides[0], stride_w=strides[1], pad_top=top, pad_bottom=bottom, pad_left=left, pad_right=right
  )
  return {name: np.int64(value) for name, value in values.items()}


def _call(target: str, shape, dtype, *operands, strides, pads, aliases=None, **attrs):
  call = jax.ffi.ffi_call(
    f'resunet_onednn_{target}',
    jax.ShapeDtypeStruct(shape, dtype),
    vmap_method='sequential',
    input_output_aliases=aliases,
  )
  return call(*operands, **_attrs(strides, pads), **{name: np.int64(value) for name, value in attrs.items()})


def _xla(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _out_shape(x, w, strides, pads):
  return jax.eval_shape(functools.partial(_xla, strides=strides, pads=pads), x, w).shape


def _static(x, w, strides, padding) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
  """Strides and explicit `(low, high)` pads as Python ints (`padding` may be 'SAME'/'VALID')."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
  return tuple(int(s) for s in strides), tuple((int(low), int(high)) for low, high in padding)


def _forward(x, w, strides, pads):
  def onednn(x, w):
    return _call('ConvForward', _out_shape(x, w, strides, pads), x.dtype, x, w, strides=strides, pads=pads)

  return lax.platform_dependent(x, w, cpu=onednn, default=functools.partial(_xla, strides=strides, pads=pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
  return _forward(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
  return _forward(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, residuals, dy):
  x, w = residuals

  def onednn(x, w, dy):
    dx = _call('ConvBackwardData', x.shape, x.dtype, dy, w, strides=strides, pads=pads)
    # dx is an operand the handler does not read. The kernel gradient then follows the last read
    # of the kernel, and so does an optimizer step that updates the kernel in place (a donated
    # train state): without that order XLA copies every kernel at the start of the step and holds
    # the copies through it (120 MB of U-Net base 64's 379 MB of temporaries). It keeps the first
    # layer's input gradient, otherwise unused, at 0.1-0.2% of a step's arithmetic.
    dw = _call('ConvBackwardWeights', w.shape, w.dtype, x, dy, dx, strides=strides, pads=pads)
    return dx, dw

  def xla(x, w, dy):
    return jax.vjp(functools.partial(_xla, strides=strides, pads=pads), x, w)[1](dy)

  return lax.platform_dependent(x, w, dy, cpu=onednn, default=xla)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _xla_bias_relu(x, w, b, strides, pads):
  return jax.nn.relu(_xla(x, w, strides, pads) + b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_bias_relu(x, w, b, strides, pads):
  def onednn(x, w, b):
    return _call('ConvForwardBiasRelu', _out_shape(x, w, strides, pads), x.dtype, x, w, b, strides=strides, pads=pads)

  default = functools.partial(_xla_bias_relu, strides=strides, pads=pads)
  return lax.platform_dependent(x, w, b, cpu=onednn, default=default)


def _conv_bias_relu_fwd(x, w, b, strides, pads):
  y = _conv_bias_relu(x, w, b, strides, pads)
  return y, (x, w, y)


def _conv_bias_relu_bwd(strides, pads, residuals, dy):
  x, w, y = residuals
  # The ReLU's mask comes from its output, the primitive's result, so the backward pass keeps
  # one tensor per convolution, where a separate bias-add and ReLU leave XLA keeping the
  # convolution's raw output as well (it recomputes the mask from it).
  dz = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
  dx, dw = _conv_bwd(strides, pads, (x, w), dz)
  return dx, dw, dz.sum(axis=(0, 1, 2))


_conv_bias_relu.defvjp(_conv_bias_relu_fwd, _conv_bias_relu_bwd)


@reverse_only
def conv_bias_relu(x, w, b, strides=(1, 1), padding='SAME'):
  """`relu(conv(x, w) + b)` for NHWC `x`, HWIO `w` and `[O]` `b`, all float32.

  On CPU one oneDNN primitive (the bias and the ReLU as post-ops); elsewhere XLA's convolution,
  add and ReLU. Values match the unfused form to float32 rounding, and so do the gradients,
  whose ReLU mask is read from the output (`y > 0`, the same mask as `x > 0`).
  """
  load()
  return _conv_bias_relu(x, w, b, *_static(x, w, strides, padding))


def _xla_bias_add(x, w, b, z, strides, pads, relu):
  y = _xla(x, w, strides, pads) + b + z
  return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _conv_bias_add(x, w, b, z, strides, pads, relu):
  def onednn(x, w, b, z):
    # The result is written over z's buffer (an alias), which the primitive adds in place.
    return _call(
      'ConvForwardBiasSum', z.shape, x.dtype, x, w, b, z, strides=strides, pads=pads, aliases={3: 0}, relu=relu
    )

  default = functools.partial(_xla_bias_add, strides=strides, pads=pads, relu=relu)
  return lax.platform_dependent(x, w, b, z, cpu=onednn, default=default)


def _conv_bias_add_fwd(x, w, b, z, strides, pads, relu):
  y = _conv_bias_add(x, w, b, z, strides, pads, relu)
  return y, (x, w, y if relu else None)


def _conv_bias_add_bwd(strides, pads, relu, residuals, dy):
  x, w, y = residuals
  dz = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype)) if relu else dy
  dx, dw = _conv_bwd(strides, pads, (x, w), dz)
  return dx, dw, dz.sum(axis=(0, 1, 2)), dz


_conv_bias_add.defvjp(_conv_bias_add_fwd, _conv_bias_add_bwd)


@reverse_only
def conv_bias_add(x, w, b, z, strides=(1, 1), padding='SAME', relu=False):
  """`conv(x, w) + b + z`, then `relu` if asked, for NHWC `x` and `z`, HWIO `w`, `[O]` `b`, float32.

  On CPU one oneDNN primitive, whose sum post-op adds `z` where the result is written (the
  result takes `z`'s buffer); elsewhere XLA's convolution and adds. With `relu` the gradients
  read the ReLU's mask from the output, as `conv_bias_relu`'s do.
  """
  load()
  strides, pads = _static(x, w, strides, padding)
  if z.shape != _out_shape(x, w, strides, pads):
    raise ValueError(f'conv_bias_add: z has shape {z.shape}, the convolution gives {_out_shape(x, w, strides, pads)}')
  return _conv_bias_add(x, w, b, z, strides, pads, bool(relu))


def kernel_gradient(x, dy, kernel_shape, strides=(1, 1), padding='SAME'):
  """The kernel gradient of an NHWC/HWIO float32 convolution alone, as one oneDNN call (CPU only).

  For timing it (benchmarks/conv_layers.py): the gradient of `conv_general_dilated` computes it
  after, and ordered by, the input gradient. The ordering operand is `x` here, not read.
  """
  load()
  w = jax.ShapeDtypeStruct(kernel_shape, x.dtype)
  strides, pads = _static(x, w, strides, padding)
  return _call('ConvBackwardWeights', tuple(kernel_shape), x.dtype, x, dy, x, strides=strides, pads=pads)


@reverse_only
def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
):
  """`lax.conv_general_dilated`, computed by oneDNN on CPU where it supports the case."""
  # oneDNN 3.2's kernel gradient of a strided 1x1 convolution (a projection shortcut with
  # `downsample='stride'`) is wrong here, by an amount that depends on what ran before it
  # (tests/cpu/test_onednn.py): those, a few cheap matmuls, stay XLA's.
  strided_1x1 = tuple(rhs.shape[:2]) == (1, 1) and tuple(window_strides) != (1, 1)
  supported = (
    not strided_1x1
    and lhs.ndim == 4
    and lhs.dtype == rhs.dtype == np.float32
    and feature_group_count == batch_group_count == 1
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and preferred_element_type in (None, np.float32)
    and dimension_numbers is not None
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if not supported:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  load()
  return _conv(lhs, rhs, *_static(lhs, rhs, window_strides, padding))
