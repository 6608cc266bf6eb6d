r"""Where a training step's time goes: every convolution of a preset, forward and both gradients.

  python benchmarks/conv_layers.py --model=unet --base-width=16 --batch=4 --size=128
  python benchmarks/conv_layers.py --model=unet --base-width=16 --compare   # vs PyTorch, needs .[bench]

Traces the model's forward pass, collects its convolutions (input shape, kernel shape, stride,
padding; a shape that occurs several times is timed once and counted with its multiplicity) and
times each one jitted on its own: the forward convolution (`fwd`), the gradient with respect to
its input (`dx`) and the gradient with respect to its kernel (`dw`; with oneDNN's convolutions the
kernel-gradient call alone, `onednn.kernel_gradient`), medians of `--repeats` calls.
Prints one JSON line: per layer the milliseconds of each part, and totals per part over the
network. `--compare` times the same shapes in PyTorch channels_last in a child process (which
imports neither JAX nor this package) and adds its figures and ours/PyTorch ratios (above 1: we
are faster). The totals leave out everything but convolutions (activations, pooling, the loss,
the optimizer): `benchmarks/train_step.py` measures the whole step.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

PARTS = ('fwd', 'dx', 'dw')


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='unet', help='preset: unet, resunet, resunet_zhang')
  parser.add_argument('--base-width', type=int, default=16)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=10, help='timed calls per part (median)')
  parser.add_argument(
    '--backend', default='auto', help="ours: the layer set, 'auto', 'stock' or 'cpu' (runtime.backend)"
  )
  parser.add_argument('--compare', action='store_true', help='time the same shapes in PyTorch channels_last too')
  parser.add_argument('--torch-layers', help=argparse.SUPPRESS)  # set by --compare for its child
  return parser.parse_args(argv)


def _median_ms(call, repeats: int) -> float:
  for _ in range(2):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return round(statistics.median(times) * 1000, 3)


def conv_layers(args) -> list[dict]:
  """The model's convolutions as `{'x': NHWC, 'w': HWIO, 'stride', 'padding', 'count'}`, in order."""
  import jax
  import jax.numpy as jnp

  from resunet_jax import models

  # Traced with XLA's convolutions, whose primitives carry the shapes (oneDNN's are custom calls).
  model = models.UNet(models.preset(args.model, base_width=args.base_width))
  images = jnp.zeros((args.batch, args.size, args.size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, train=False))(variables)
  found = collections.Counter()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name != 'conv_general_dilated':
      continue
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    numbers = eqn.params['dimension_numbers']
    x = tuple(lhs[i] for i in numbers.lhs_spec)  # N, C, spatial...
    w = tuple(rhs[i] for i in numbers.rhs_spec)  # O, I, spatial...
    key = (
      (x[0], x[2], x[3], x[1]),
      (w[2], w[3], w[1], w[0]),
      tuple(eqn.params['window_strides']),
      tuple(map(tuple, eqn.params['padding'])),
    )
    found[key] += 1
  return [{'x': x, 'w': w, 'stride': s, 'padding': p, 'count': n} for (x, w, s, p), n in found.items()]


def time_jax(layers: list[dict], repeats: int, backend: str = 'auto') -> list[dict]:
  """Ours: each part of each layer jitted on its own, in milliseconds, with `backend`'s convolution."""
  from jax import lax

  from resunet_jax import models, runtime
  from resunet_jax.cpu import onednn

  on_cpu = runtime.layers(backend) is not models.STOCK
  conv_general_dilated = onednn.conv_general_dilated if on_cpu else lax.conv_general_dilated
  return [_time_jax_layer(layer, repeats, conv_general_dilated) for layer in layers]


def _time_jax_layer(layer: dict, repeats: int, conv_general_dilated) -> dict:
  import jax

  from resunet_jax.cpu import onednn

  def conv(x, w):
    return conv_general_dilated(x, w, layer['stride'], layer['padding'], dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], layer['x'])
  w = jax.random.normal(keys[1], layer['w']) * 0.1
  g = jax.random.normal(keys[2], jax.eval_shape(conv, x, w).shape)
  parts = {
    'fwd': jax.jit(lambda x, w, g: conv(x, w)),
    'dx': jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
    'dw': jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]),
  }
  if conv_general_dilated is onednn.conv_general_dilated:  # whose `dw` above includes `dx`
    parts['dw'] = jax.jit(lambda x, w, g: onednn.kernel_gradient(x, g, w.shape, layer['stride'], layer['padding']))
  return {name: _median_ms(lambda f=f: f(x, w, g).block_until_ready(), repeats) for name, f in parts.items()}


def time_torch(layers: list[dict], repeats: int) -> list[dict]:
  """PyTorch channels_last: the forward convolution and `torch.nn.grad`'s two gradients."""
  import torch
  from torch.nn import functional as F  # noqa: N812 (PyTorch's own convention)

  torch.manual_seed(0)
  last = torch.channels_last
  out = []
  for layer in layers:
    (n, h, wd, c), (kh, kw, ci, co) = layer['x'], layer['w']
    (top, bottom), (left, right) = layer['padding']
    x = torch.randn(n, c, h, wd).contiguous(memory_format=last)
    x = F.pad(x, (left, right, top, bottom)).contiguous(memory_format=last)  # XLA's padding, as given
    w = (torch.randn(co, ci, kh, kw) * 0.1).contiguous(memory_format=last)
    stride = layer['stride']
    with torch.inference_mode():
      g = torch.randn_like(F.conv2d(x, w, stride=stride)).contiguous(memory_format=last)

      def fwd(x=x, w=w, stride=stride):
        F.conv2d(x, w, stride=stride)

      def dx(x=x, w=w, g=g, stride=stride):
        torch.nn.grad.conv2d_input(x.shape, w, g, stride=stride)

      def dw(x=x, w=w, g=g, stride=stride):
        torch.nn.grad.conv2d_weight(x, w.shape, g, stride=stride)

      out.append({part: _median_ms(call, repeats) for part, call in zip(PARTS, (fwd, dx, dw), strict=True)})
  return out


def _totals(layers: list[dict], times: list[dict]) -> dict:
  totals = {part: sum(layer['count'] * t[part] for layer, t in zip(layers, times, strict=True)) for part in PARTS}
  totals['all'] = sum(totals.values())
  return {key: round(value, 2) for key, value in totals.items()}


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  if args.torch_layers:  # the --compare child
    print(json.dumps(time_torch(json.loads(args.torch_layers), args.repeats)))
    return
  layers = conv_layers(args)
  ours = time_jax(layers, args.repeats, args.backend)
  result = {
    'benchmark': 'conv_layers',
    'model': args.model,
    'backend': args.backend,
    'base_width': args.base_width,
    'batch': args.batch,
    'size': args.size,
    'conv_calls': sum(layer['count'] for layer in layers),
    'layers': [layer | {'jax_ms': t} for layer, t in zip(layers, ours, strict=True)],
    'jax_total_ms': _totals(layers, ours),
  }
  if args.compare:
    command = [sys.executable, os.path.abspath(__file__), f'--repeats={args.repeats}']
    child = subprocess.run([*command, f'--torch-layers={json.dumps(layers)}'], capture_output=True, text=True)
    if child.returncode:
      raise SystemExit(f'the PyTorch child failed (pip install -e ".[bench]"?): {child.stderr.strip()[-500:]}')
    theirs = json.loads(child.stdout.strip().splitlines()[-1])
    for row, t in zip(result['layers'], theirs, strict=True):
      row['torch_channels_last_ms'] = t
    result['torch_channels_last_total_ms'] = _totals(layers, theirs)
    ours_total, theirs_total = result['jax_total_ms'], result['torch_channels_last_total_ms']
    result['ours_over_torch_channels_last'] = {key: round(theirs_total[key] / ours_total[key], 3) for key in ours_total}
  print(json.dumps(result))


if __name__ == '__main__':
  main(sys.argv[1:])
