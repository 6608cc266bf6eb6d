r"""Training-step and inference throughput of a preset, ours (JAX) or a PyTorch port, or both.

  python benchmarks/train_step.py --model=unet --base-width=64 --batch=4 --size=128
  python benchmarks/train_step.py --model=unet --base-width=64 --batch=4 --size=128 --infer
  python benchmarks/train_step.py --model=resunet --base-width=16 --compare   # vs PyTorch, needs .[bench]
  python benchmarks/train_step.py --model=unet --base-width=16 --compare --repeats=3   # median of 3 rounds
  python benchmarks/train_step.py --model=unet --base-width=16 --backend=stock   # the stock layers alone
  python benchmarks/train_step.py --model=unet --base-width=64 --batch=64 --size=256 --dtype=bfloat16  # a GPU
  python benchmarks/train_step.py --model=unet --base-width=16 --batch=2 --size=64 --spatial-dims=3 --compare  # 64^3

One training step is forward, sigmoid BCE, backward and Adam on random float32 inputs, computed
in `--dtype` (parameters stay float32); inference is the forward pass. Prints one JSON line:
`images_per_sec`, `step_ms_median` (the median of `--steps` steps after `--warmup`), `compile_s`
(JAX: the first call), `model_flops_per_step` (twice the multiply-adds of the step's
convolutions and matrix products, `model_flops`), `gflops_per_sec` (XLA's count of the step's
floating-point operations over the median time, for both frameworks; on a GPU, where XLA counts
none, the model FLOPs), `percent_of_matmul_peak` (against a jitted matmul timed in the same
process: 2048x2048 float32 on a CPU, 8192x8192 in `--dtype` on a GPU), `peak_rss_mb` (the
process's resident set size at its peak) and `params`. On a GPU it adds `device_peak_mb` (the
accelerator memory the process held at its peak) and, for a chip `DATASHEET_TFLOPS` knows,
`mfu_percent` (model FLOPs over the median time against the chip's dense peak). `--backend` picks
our layer set (`resunet_jax.runtime`: auto, stock, cpu). `--compare` runs ours (`--backend`),
ours with the stock layers (where `--backend` is not stock already), PyTorch NCHW and PyTorch
channels_last (on the GPU, if PyTorch has one), each in its own process (so each peak memory is
its own), and prints their lines and the ratios ours/PyTorch, the stock layers' beside ours;
`--repeats=N` runs N interleaved rounds and gives the median ratios.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='unet', help='preset: unet, resunet, resunet_zhang')
  parser.add_argument('--base-width', type=int, default=64)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--spatial-dims', type=int, choices=(2, 3), default=2, help='3: volumes of size^3')
  parser.add_argument('--infer', action='store_true', help='time inference instead of a training step')
  parser.add_argument(
    '--dtype', choices=('float32', 'bfloat16'), default='float32', help='compute dtype (parameters stay float32)'
  )
  parser.add_argument('--steps', type=int, default=10, help='timed steps (at least 10 for reported figures)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--framework', choices=('jax', 'torch'), default='jax')
  parser.add_argument(
    '--backend', default='auto', help="JAX: the layer set, 'auto', 'stock' or 'cpu' (runtime.backend)"
  )
  parser.add_argument('--channels-last', action='store_true', help='PyTorch: NHWC memory format')
  parser.add_argument(
    '--devices', type=int, default=1, help='JAX: split the CPU into this many devices and the batch over them'
  )
  parser.add_argument('--compare', action='store_true', help='ours, PyTorch NCHW and channels_last, side by side')
  parser.add_argument('--repeats', type=int, default=1, help='--compare: interleaved rounds (the ratios are medians)')
  # Set by --compare for its PyTorch processes, which then import neither JAX nor our package:
  parser.add_argument('--torch-model', help=argparse.SUPPRESS)  # JSON of torch_unet.fields(config)
  parser.add_argument('--flops', type=float, default=float('nan'), help=argparse.SUPPRESS)
  parser.add_argument('--model-flops', type=float, default=float('nan'), help=argparse.SUPPRESS)
  parser.add_argument('--matmul-peak', type=float, default=float('nan'), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f'--repeats={args.repeats} must be at least 1')
  return args


def _timed(step, count: int) -> list[float]:
  times = []
  for _ in range(count):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by `device_kind`
# substring; H100 SXM5 ("NVIDIA H100 80GB HBM3") and H200: 989.4 bf16, H100 PCIe: 756.5,
# A100: 312. The first matching substring wins.
DATASHEET_TFLOPS = (
  ('H100 PCIe', {'bfloat16': 756.5}),
  ('H100', {'bfloat16': 989.4}),
  ('H200', {'bfloat16': 989.4}),
  ('A100', {'bfloat16': 312.0}),
)


def datasheet_tflops(device_kind: str, dtype: str) -> float:
  """The chip's dense peak for `dtype`, or NaN where the table does not know it."""
  for name, peaks in DATASHEET_TFLOPS:
    if name in device_kind:
      return peaks.get(dtype, float('nan'))
  return float('nan')


def matmul_peak_gflops(size: int = 2048, repeats: int = 10, dtype: str = 'float32') -> float:
  """GFLOP/s of a jitted `size` x `size` matmul in `dtype`: this machine's practical peak."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, a).block_until_ready()
  times = _timed(lambda: matmul(a, a).block_until_ready(), repeats)
  return 2 * size**3 / statistics.median(times) / 1e9


def _config(args, **overrides):
  from resunet_jax import models

  return models.preset(args.model, base_width=args.base_width, spatial_dims=args.spatial_dims, **overrides)


def model_flops(jaxpr) -> float:
  """Twice the multiply-adds of the convolutions and matrix products in `jaxpr` (a ClosedJaxpr).

  The model FLOPs of model FLOPs utilisation (Chowdhery et al. 2022, PaLM, appendix B): what
  the network's arithmetic needs, not XLA's count of every elementwise operation. A convolution
  costs 2 x output elements x the kernel's input features x its spatial size, padded positions
  included (the textbook count, 27.84 GFLOP for the note's U-Net forward at 128x128; XLA's own
  count leaves them out: 26.55).
  """
  total = 0.0
  for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, 'jaxpr') else jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out features, in features, spatial...)
      window = math.prod(rhs[d] for d in rhs_spec[2:])
      total += 2.0 * math.prod(out) * rhs[rhs_spec[1]] * window
    elif name == 'dot_general':
      (lhs_contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contracting)
    for param in eqn.params.values():  # jit, remat, custom derivatives, cond branches
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          total += model_flops(sub)
  return total


def _jax_program(args, mesh, backend: str, abstract: bool = False):
  """The jitted step (or forward pass) with `backend`'s layers, its operands and `run(step, operands) -> operands`.

  `abstract`: the operands are shapes only (`jax.ShapeDtypeStruct`), enough to lower the step.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from resunet_jax import models, runtime
  from resunet_jax.training import parallel

  config = _config(args, dtype=args.dtype)
  model = models.UNet(config, layers=runtime.layers(backend, config))
  spatial = (args.size,) * args.spatial_dims
  images = jax.random.normal(jax.random.key(0), (args.batch, *spatial, 3))
  masks = (jax.random.uniform(jax.random.key(1), (args.batch, *spatial, 1)) > 0.9).astype(jnp.float32)
  # As the training loop does: one jitted init on one image, created replicated (an eager init
  # runs the forward pass op by op and leaves its buffers in the allocator: +320 MB peak at base 64).
  init = jax.jit(lambda key: model.init(key, images[:1], train=False), out_shardings=parallel.replicated(mesh))
  if abstract:
    variables = jax.eval_shape(init, jax.random.key(2))
    images, masks = jax.eval_shape(lambda: (images, masks))
  else:
    variables = init(jax.random.key(2))
    images, masks = jax.device_put((images, masks), parallel.batch_sharding(mesh))
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  optimizer = optax.adam(1e-3)

  def forward(params, batch_stats, images, train):
    if batch_stats and train:
      logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
      )
      return logits, updates['batch_stats']
    return model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False), batch_stats

  if args.infer:
    step = jax.jit(lambda params, batch_stats, images: forward(params, batch_stats, images, False)[0])
    operands = (params, batch_stats, images)

    def run(step, operands):
      step(*operands).block_until_ready()
      return operands
  else:

    def train_step(params, opt_state, batch_stats, images, masks):
      def loss_fn(params):
        logits, new_stats = forward(params, batch_stats, images, True)
        return optax.sigmoid_binary_cross_entropy(logits, masks).mean(), new_stats

      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, new_stats, loss

    step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    opt_state = jax.eval_shape(optimizer.init, params) if abstract else optimizer.init(params)
    operands = (params, opt_state, batch_stats, images, masks)

    def run(step, operands):
      params, opt_state, stats, loss = step(*operands)
      loss.block_until_ready()
      return (params, opt_state, stats, *operands[3:])

  return step, operands, run


def jax_step(args) -> tuple[dict, dict]:
  """Our step: returns the figures and the flop counts of one step (`flops`: XLA's, `model_flops`)."""
  import jax

  from resunet_jax import models, runtime
  from resunet_jax.training import parallel

  mesh = parallel.make_mesh()
  layers = runtime.layers(args.backend, _config(args))
  step, operands, run = _jax_program(args, mesh, args.backend)
  jax.clear_caches()  # as the training loop does: the initialiser's executable is not run again
  params = operands[0]
  start = time.perf_counter()
  traced = step.trace(*operands)
  lowered = traced.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # XLA counts no flops inside custom calls (oneDNN's convolutions), so the counts are the same
  # step's with the stock layers, lowered, not compiled: the unpartitioned program, all devices' flops.
  if layers is not models.STOCK:  # on abstract operands: the twin allocates no parameters or optimizer state of its own
    twin, abstract, _ = _jax_program(args, mesh, 'stock', abstract=True)
    traced = twin.trace(*abstract)
    lowered = traced.lower()
  counts = {'model_flops': model_flops(traced.jaxpr)}
  # A GPU lowering counts nothing, and the compiled GPU program hides its convolutions in cuDNN
  # calls: there the count is the model FLOPs.
  counts['flops'] = (lowered.cost_analysis() or {}).get('flops', counts['model_flops'])
  del traced, lowered
  for _ in range(args.warmup):
    operands = run(compiled, operands)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    operands = run(compiled, operands)
    times.append(time.perf_counter() - start)
  figures = {'compile_s': round(compile_s, 2), 'params': models.count_params(params), 'layers': layers.name}
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    figures['device_peak_mb'] = round(stats['peak_bytes_in_use'] / 2**20, 1)
  return figures | _rates(args, times, counts['flops']), counts


def torch_step(args) -> tuple[dict, str]:
  """The PyTorch port's step, on the GPU if there is one: its figures and the device's name."""
  import torch

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_unet

  torch.manual_seed(0)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'  # as JAX takes its accelerator when there is one
  fields = json.loads(args.torch_model) if args.torch_model else torch_unet.fields(_config(args))
  model = torch_unet.UNet(**fields).to(device)
  spatial = (args.size,) * args.spatial_dims
  images = torch.randn(args.batch, 3, *spatial, device=device)
  masks = (torch.rand(args.batch, 1, *spatial, device=device) > 0.9).float()
  if args.channels_last:
    layout = torch.channels_last if args.spatial_dims == 2 else torch.channels_last_3d
    model = model.to(memory_format=layout)
    images, masks = images.contiguous(memory_format=layout), masks.contiguous(memory_format=layout)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = torch.nn.BCEWithLogitsLoss()
  # Mixed precision as ours: float32 parameters, `--dtype` arithmetic.
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None

  if args.infer:
    model.eval()

    def run():
      with torch.inference_mode(), autocast:
        model(images)
      sync()
  else:
    model.train()

    def run():
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = loss_fn(model(images).float(), masks)
      loss.backward()
      optimizer.step()
      sync()

  for _ in range(args.warmup):
    run()
  times = _timed(run, args.steps)
  params = sum(p.numel() for p in model.parameters())
  figures = {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'params': params}
  if device == 'cuda':
    figures['device_peak_mb'] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
  name = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
  return figures | _rates(args, times, args.flops), name


def _rates(args, times: list[float], flops: float) -> dict:
  median = statistics.median(times)
  return {
    'images_per_sec': round(args.batch / median, 2),
    'step_ms_median': round(median * 1000, 1),
    'step_ms_min': round(min(times) * 1000, 1),
    'gflops_per_sec': round(flops / median / 1e9, 1),
  }


def measure(args) -> dict:
  """The figures of one framework, in this process."""
  if args.framework == 'jax':
    if args.devices > 1:  # before JAX starts
      os.environ['XLA_FLAGS'] = (
        f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={args.devices}'
      )
    import jax

    from resunet_jax.cpu import hostmem

    on_gpu = jax.default_backend() == 'gpu'
    peak = matmul_peak_gflops(8192, dtype=args.dtype) if on_gpu else matmul_peak_gflops()
    figures, counts = jax_step(args)
    figures['huge_pages'] = hostmem.enabled()
    figures['keep_blocks'] = hostmem.keeping_blocks()
    device = jax.devices()[0].device_kind
  else:
    peak, counts = args.matmul_peak, {'flops': args.flops, 'model_flops': args.model_flops}
    figures, device = torch_step(args)
  flops = counts['flops']
  result = {
    'benchmark': 'infer' if args.infer else 'train_step',
    'framework': args.framework + ('_channels_last' if args.channels_last else ''),
    'model': args.model,
    'base_width': args.base_width,
    'batch': args.batch,
    'size': args.size,
    **({'spatial_dims': 3} if args.spatial_dims == 3 else {}),
    'dtype': args.dtype,
    'devices': args.devices if args.framework == 'jax' else 1,
    'gflops_per_step': float(f'{flops / 1e9:.4g}'),
    'matmul_peak_gflops': round(peak, 1),
    **figures,
    'device': device,
    'cpu_count': os.cpu_count(),
  }
  result['percent_of_matmul_peak'] = round(100 * result['gflops_per_sec'] / peak, 1)
  result['model_flops_per_step'] = float(f'{counts["model_flops"]:.4g}')
  datasheet = datasheet_tflops(device, args.dtype)
  if not math.isnan(datasheet):  # a chip the table knows: model FLOPs utilisation against its datasheet
    achieved = counts['model_flops'] / (result['step_ms_median'] / 1000)
    result['mfu_percent'] = round(100 * achieved / 1e12 / datasheet, 1)
  result['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  return result


def memory_field(*lines: dict) -> str:
  """The peak memory to compare: the accelerator's where every line has it, else the host's."""
  return 'device_peak_mb' if all('device_peak_mb' in line for line in lines) else 'peak_rss_mb'


def compare(argv: list[str], repeats: int) -> list[dict]:
  """Ours, PyTorch NCHW and PyTorch channels_last, each in a fresh process, `repeats` rounds; then the ratios.

  The rounds interleave the three, so a drift in the machine's speed hits all of them; the
  ratio line gives the median over the rounds of each round's ratio, and every round's.
  """
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_unet

  argv = [a for a in argv if a != '--compare' and not a.startswith('--repeats=')]
  if '--repeats' in argv:  # the spaced form
    at = argv.index('--repeats')
    del argv[at : at + 2]

  def child(*extra):
    out = subprocess.run([sys.executable, __file__, *argv, *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

  stock_too = parse_args(argv).backend != 'stock'
  lines, rounds = [], collections.defaultdict(list)
  for _ in range(repeats):
    ours = child('--framework=jax')
    stock = child('--framework=jax', '--backend=stock') if stock_too else None
    torch_args = [
      '--framework=torch',
      f'--torch-model={json.dumps(torch_unet.fields(_config(parse_args(argv))))}',
      f'--flops={ours["gflops_per_step"] * 1e9}',
      f'--model-flops={ours.get("model_flops_per_step", float("nan"))}',
      f'--matmul-peak={ours["matmul_peak_gflops"]}',
    ]
    nchw, nhwc = child(*torch_args), child(*torch_args, '--channels-last')
    if not ours['params'] == nchw['params'] == nhwc['params']:
      raise SystemExit(f'parameter counts differ: ours {ours["params"]}, PyTorch {nchw["params"]}')
    lines += [line for line in (ours, stock, nchw, nhwc) if line is not None]
    for name, line in (('ours', ours), ('stock', stock)):
      if line is None:
        continue
      rounds[f'{name}_over_torch'].append(round(line['images_per_sec'] / nchw['images_per_sec'], 3))
      rounds[f'{name}_over_torch_channels_last'].append(round(line['images_per_sec'] / nhwc['images_per_sec'], 3))
      memory = memory_field(line, nhwc)
      rounds[f'memory_{name}_over_torch_channels_last'].append(round(line[memory] / nhwc[memory], 3))
  ratio = {'benchmark': f'{ours["benchmark"]}_ratio', 'model': ours['model'], 'base_width': ours['base_width']}
  ratio |= {'params': ours['params'], 'rounds': repeats}
  ratio |= {name: round(statistics.median(values), 3) for name, values in rounds.items()}
  ratio |= {f'{name}_rounds': values for name, values in rounds.items()} if repeats > 1 else {}
  return lines + [ratio]


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  # As the command-line tools run (`cli.run`: setup memory returned after compiling); PyTorch with glibc's defaults.
  if args.framework == 'jax' and not args.compare:
    from resunet_jax.cpu import hostmem

    hostmem.relaunch_for_cpu()
  for line in compare(argv, args.repeats) if args.compare else [measure(args)]:
    print(json.dumps(line))


if __name__ == '__main__':
  main(sys.argv[1:])
