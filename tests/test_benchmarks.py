"""The benchmark commands the README quotes run and print their JSON line."""

import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from resunet_jax import models, runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import train_step  # noqa: E402 (the benchmark script, imported for its helpers)

TINY = ['--base-width=2', '--batch=2', '--size=32']  # the smallest network and images that compile fast


@pytest.fixture
def bench(commands):
  """Runs `benchmarks/<script>` with `args`; returns its JSON lines."""

  def run(script: str, *args: str, env=None) -> list[dict]:
    result = commands.run([sys.executable, f'benchmarks/{script}', *args], env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()]

  return run


def test_input_pipeline_benchmark_prints_its_figures(tfds_dir, bench):
  args = ['--data=synthetic_roads/small', '--batch=4', '--batches=3', '--step', '--base_width=2', '--steps=1']
  (figures,) = bench('input_pipeline.py', *args, env={**os.environ, 'TFDS_DATA_DIR': tfds_dir})
  assert figures['images_per_sec'] > 0 and figures['step_images_per_sec'] > 0
  ratio = figures['images_per_sec'] / figures['step_images_per_sec']
  assert figures['pipeline_over_step'] == pytest.approx(ratio, rel=0.05, abs=0.1)


def _conv_flops_by_hand(params, side=32, batch=2):
  """Forward FLOPs of each convolution of a preset's parameters: 2 x outputs x input channels x taps.

  A block's convolutions run at its level's resolution (`enc_l`, `dec_l`: side / 2**l; the
  bottleneck: side / 2**depth; the head: side). Returns `{(block, conv): flops}`.
  """
  depth = sum(name.startswith('enc_') for name in params)
  flops = {}
  for block, convs in params.items():
    level = depth if block == 'bottleneck' else 0 if block == 'head' else int(block.split('_')[1])
    for name, conv in convs.items() if block != 'head' else [('head', convs)]:
      k, _, cin, cout = conv['kernel'].shape
      flops[block, name] = 2 * batch * (side // 2**level) ** 2 * k * k * cin * cout
  return flops


@pytest.mark.parametrize(
  'extra', [[], ['--infer'], ['--devices=2', '--dtype=bfloat16']], ids=['train', 'infer', 'two devices in bfloat16']
)
def test_train_step_benchmark_prints_its_figures(extra, bench):
  (figures,) = bench('train_step.py', '--model=resunet', *TINY, '--steps=2', '--warmup=1', *extra)
  assert figures['benchmark'] == ('infer' if extra == ['--infer'] else 'train_step')
  assert figures['dtype'] == ('bfloat16' if '--dtype=bfloat16' in extra else 'float32')
  assert figures['model_flops_per_step'] > 0
  assert 'mfu_percent' not in figures  # no datasheet peak for a CPU
  config = models.preset('resunet', base_width=2)
  shapes = jax.eval_shape(lambda: models.UNet(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert figures['params'] == sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params']))
  # Counted as the network is written, whatever layers ran (the CPU ones do fewer multiply-adds).
  assert figures['layers'] == ('stock' if '--devices=2' in extra else runtime.auto_backend())
  flops = _conv_flops_by_hand(shapes['params'])
  # Training: each convolution forward, its kernel gradient, and its input gradient, but not of the
  # two that read the image (enc_0's conv1 and conv_proj).
  first = flops['enc_0', 'conv1'] + flops['enc_0', 'conv_proj']
  expected = sum(flops.values()) if extra == ['--infer'] else 3 * sum(flops.values()) - first
  assert figures['model_flops_per_step'] == pytest.approx(expected, rel=1e-3)  # the global batch's, on any devices
  for key in ('images_per_sec', 'step_ms_median', 'compile_s', 'gflops_per_step', 'matmul_peak_gflops', 'peak_rss_mb'):
    assert figures[key] > 0, key
  # step_ms_median is rounded to 0.1 ms (a tiny network's inference step takes about 1 ms)
  assert 2000 / figures['images_per_sec'] == pytest.approx(figures['step_ms_median'], rel=0.01, abs=0.051)
  assert figures['percent_of_matmul_peak'] == pytest.approx(
    100 * figures['gflops_per_sec'] / figures['matmul_peak_gflops'],
    rel=0.02,
    abs=0.1,  # both rounded to 0.1
  )


def test_model_flops_count_convolutions_and_matrix_products_inside_nested_programs():
  x, w = jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 5))
  a, b = jnp.zeros((4, 6)), jnp.zeros((6, 7))

  def f(x, w, a, b):
    y = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.jit(jnp.matmul)(a, b).sum() + jnp.tanh(y).sum()  # the tanh and the sums count nothing

  expected = 2 * (2 * 8 * 8 * 5) * 3 * 9 + 2 * (4 * 7) * 6
  assert train_step.model_flops(jax.make_jaxpr(f)(x, w, a, b)) == expected


def test_model_flops_of_the_note_unet_match_the_analytic_count():
  """27.8 GFLOP per 128x128 forward (the performance issue's analytic figure); training ~3x."""
  model = models.UNet(models.preset('unet'))
  images = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), train=False))
  forward = train_step.model_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images))
  assert forward == pytest.approx(27.8e9, rel=0.005)

  def loss(v, x):
    return model.apply(v, x, train=False).mean()

  training = train_step.model_flops(jax.make_jaxpr(jax.grad(loss))(variables, images))
  # Forward, input gradients and kernel gradients: 3x, less the first layer's input gradient.
  assert 2.9 * forward < training < 3 * forward


def test_datasheet_peaks_and_the_compared_memory():
  assert train_step.datasheet_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4
  assert train_step.datasheet_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.5
  assert math.isnan(train_step.datasheet_tflops('cpu', 'bfloat16'))
  assert math.isnan(train_step.datasheet_tflops('NVIDIA H100 80GB HBM3', 'float32'))
  gpu = {'device_peak_mb': 1.0, 'peak_rss_mb': 2.0}
  assert train_step.memory_field(gpu, gpu) == 'device_peak_mb'
  assert train_step.memory_field(gpu, {'peak_rss_mb': 2.0}) == 'peak_rss_mb'


def test_conv_layers_benchmark_lists_every_convolution_of_the_model(bench):
  (figures,) = bench('conv_layers.py', '--model=resunet_zhang', *TINY, '--repeats=1')
  config = models.preset('resunet_zhang', base_width=2)
  shapes = jax.eval_shape(lambda: models.UNet(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  kernels = [leaf.shape for leaf in jax.tree.leaves(shapes['params']) if leaf.ndim == 4]
  layers = figures['layers']
  assert figures['conv_calls'] == len(kernels) == sum(layer['count'] for layer in layers)
  # Every kernel of the model is timed, with its multiplicity; strided ones (the encoder's) too.
  timed = sorted(tuple(layer['w']) for layer in layers for _ in range(layer['count']))
  assert timed == sorted(kernels)
  assert any(layer['stride'] == [2, 2] for layer in layers)
  assert all(layer['x'][0] == 2 and all(layer['jax_ms'][part] > 0 for part in ('fwd', 'dx', 'dw')) for layer in layers)
  per_part = {p: sum(layer['count'] * layer['jax_ms'][p] for layer in layers) for p in ('fwd', 'dx', 'dw')}
  assert figures['jax_total_ms']['all'] == pytest.approx(sum(per_part.values()), abs=0.05)


@pytest.mark.parametrize('script', ['train_step.py', 'conv_layers.py'])
def test_side_by_side_with_pytorch(script, bench):
  """`--compare` (needs the `bench` extra; skipped without PyTorch) prints PyTorch's figures and the ratios."""
  pytest.importorskip('torch')
  timing = ['--steps=2', '--warmup=1'] if script == 'train_step.py' else ['--repeats=1']
  lines = bench(script, '--model=resunet', *TINY, *timing, '--compare')
  if script == 'train_step.py':
    ours, stock, nchw, nhwc, ratio = lines
    assert (nchw['framework'], nhwc['framework']) == ('torch', 'torch_channels_last')
    assert stock['layers'] == 'stock' and ours['layers'] == runtime.auto_backend()
    assert ours['params'] == stock['params'] == nchw['params'] == nhwc['params'] == ratio['params']
    for name, line in (('ours', ours), ('stock', stock)):
      speed = line['images_per_sec'] / nhwc['images_per_sec']
      assert ratio[f'{name}_over_torch_channels_last'] == pytest.approx(speed, rel=0.01)
  else:
    (figures,) = lines
    ours, theirs = figures['jax_total_ms'], figures['torch_channels_last_total_ms']
    assert all(layer['torch_channels_last_ms']['dw'] > 0 for layer in figures['layers'])
    expected = theirs['all'] / ours['all']  # printed to 3 decimals
    assert figures['ours_over_torch_channels_last']['all'] == pytest.approx(expected, rel=0.01, abs=6e-4)


def test_compare_rounds_interleave_and_give_median_ratios(bench):
  pytest.importorskip('torch')
  lines = bench('train_step.py', '--model=unet', *TINY, '--steps=2', '--warmup=1', '--compare', '--repeats', '2')
  frameworks = [line.get('framework') for line in lines[:-1]]
  assert frameworks == ['jax', 'jax', 'torch', 'torch_channels_last'] * 2  # ours, ours on stock layers, PyTorch
  ratio = lines[-1]
  rounds = [lines[i]['images_per_sec'] / lines[i + 3]['images_per_sec'] for i in (0, 4)]
  assert ratio['rounds'] == 2
  # Each round's ratio is printed to 3 decimals (on this tiny network it can be well below 1).
  assert ratio['ours_over_torch_channels_last_rounds'] == pytest.approx(rounds, rel=0.01, abs=6e-4)
  assert ratio['ours_over_torch_channels_last'] == pytest.approx(sum(rounds) / 2, rel=0.01, abs=6e-4)  # median of 2


def test_train_loop_benchmark_compares_the_loop_with_its_bare_step(tfds_dir, bench):
  env = {**os.environ, 'TFDS_DATA_DIR': tfds_dir}
  args = ['--config=experiments/configs/quick.py', '--model=unet', '--steps=8', '--bare_steps=2']
  (figures,) = bench('train_loop.py', *args, env=env)
  assert figures['benchmark'] == 'train_loop' and figures['batch'] == 4
  assert len(figures['loop_intervals_images_per_sec']) == 5  # logged at steps 2, 4, 6, 8 and checkpoint 3
  assert figures['loop_images_per_sec'] > 0 and figures['bare_images_per_sec'] > 0
  ratio = figures['loop_images_per_sec'] / figures['bare_images_per_sec']
  assert figures['loop_over_bare'] == pytest.approx(ratio, rel=0.01, abs=0.002)


def test_train_loop_benchmark_needs_three_logged_intervals(tfds_dir, commands):
  command = [sys.executable, 'benchmarks/train_loop.py', '--config=experiments/configs/quick.py', '--steps=2']
  result = commands.run(command, env={**os.environ, 'TFDS_DATA_DIR': tfds_dir}, timeout=300)
  assert result.returncode != 0
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .endswith('--steps=2 gives 1 logged interval(s) with train.log_every=2; give --steps for at least 3')
  )


def test_compare_needs_at_least_one_round(commands):
  result = commands.run([sys.executable, 'benchmarks/train_step.py', '--compare', '--repeats=0'], timeout=60)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].endswith('error: --repeats=0 must be at least 1')


def test_whole_image_benchmark_prints_each_sides_peak_and_the_ratio(bench):
  """Small sides and a tiny network: each side measured in its own process, then the ratio."""
  *sides, ratio = bench('whole_image.py', '--sides=96,160', '--base-width=2', '--tile=32', '--batch=4')
  assert [line['side'] for line in sides] == [96, 160] and all(line['peak_mb'] > 0 for line in sides)
  assert sides[1]['output_mb'] == pytest.approx(sides[0]['output_mb'] * (160 / 96) ** 2, rel=0.05)
  bound = sides[0]['peak_mb'] + sides[1]['output_mb'] - sides[0]['output_mb']
  assert ratio['benchmark'] == 'whole_image_ratio' and ratio['ratio'] == pytest.approx(
    sides[1]['peak_mb'] / bound, abs=1e-3
  )


def test_monuseg_table_runs_resumes_and_tabulates_per_seed_rows(tmp_path, commands):
  """The sweep on a MoNuSeg-shaped folder of tiny images: one CSV row per run, a second call
  trains nothing, and the table gives the mean and t-interval of the seeds beside the paper."""
  import csv

  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(0)
  for folder, count in (('Train_Folder', 4), ('Val_Folder', 1), ('Test_Folder', 2)):
    for i in range(count):
      for kind in ('img', 'labelcol'):
        (tmp_path / 'mn' / folder / kind).mkdir(parents=True, exist_ok=True)
      image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
      Image.fromarray(image).save(tmp_path / 'mn' / folder / 'img' / f'{i}.png')
      Image.fromarray(((image[..., 0] > 128) * 255).astype(np.uint8)).save(
        tmp_path / 'mn' / folder / 'labelcol' / f'{i}.png'
      )
  sweep = [
    sys.executable, 'benchmarks/monuseg.py', '--protocols=paper', '--presets=unet', '--seeds=0,1', '--steps=2',
    '--base-width=2', f'--root={tmp_path / "runs"}', f'--csv={tmp_path / "table.csv"}',
    '--config-arg=--config.data.image_size=32', '--config-arg=--config.model.depth=2',
  ]  # fmt: skip
  env = {**os.environ, 'MONUSEG_DIR': str(tmp_path / 'mn'), 'XLA_FLAGS': ''}
  result = commands.run(sweep, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader((tmp_path / 'table.csv').open()))
  assert [(r['protocol'], r['preset'], r['seed'], r['steps']) for r in rows] == [
    ('paper', 'unet', '0', '2'),
    ('paper', 'unet', '1', '2'),
  ]
  for row in rows:  # the row is the run's own evaluation of the test split
    record = json.loads((tmp_path / 'runs' / f'paper-unet-w2-n2-s{row["seed"]}' / 'eval_test.json').read_text())
    assert float(row['dice']) == pytest.approx(record['metrics']['dice']['mean'], abs=1e-4) and record['images'] == 2
  again = commands.run(sweep, env=env, timeout=300)
  assert again.returncode == 0 and len(list(csv.DictReader((tmp_path / 'table.csv').open()))) == 2  # nothing rerun
  dice = [float(r['dice']) for r in rows]
  low, high = np.mean(dice) + np.array([-1, 1]) * 12.706 * np.std(dice, ddof=1) / np.sqrt(2)  # t(0.975, 1)
  line = next(line for line in again.stdout.splitlines() if line.startswith('| paper | unet |'))
  assert f'{np.mean(dice):.3f} [{low:.3f}, {high:.3f}]' in line and '0.7645 / 0.6286' in line
  missing = commands.run(sweep, env={**env, 'MONUSEG_DIR': ''}, timeout=60)
  assert missing.returncode != 0 and 'MONUSEG_DIR is not set' in missing.stderr


def test_monuseg_writes_no_row_for_a_run_cut_short(tmp_path, monkeypatch):
  """train.py exits 0 when SIGTERM stops it (checkpointed): the sweep must stop there, not score
  the partial run as a finished one."""
  import importlib.util

  spec = importlib.util.spec_from_file_location('monuseg_bench', ROOT / 'benchmarks' / 'monuseg.py')
  monuseg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(monuseg)
  calls = []
  monkeypatch.setattr(monuseg.subprocess, 'run', lambda command, **kwargs: calls.append(command))
  workdir = tmp_path / 'paper-unet-w2-n400-s0'
  assert monuseg.trained_step(workdir) == 0
  for step in ('100', '200', 'tmp'):
    (workdir / 'checkpoints' / step).mkdir(parents=True)
  assert monuseg.trained_step(workdir) == 200
  with pytest.raises(SystemExit, match='stopped at step 200 of 400; rerun'):
    monuseg.one_run('paper', 'unet', 0, 400, 2, tmp_path)
  assert len(calls) == 1 and 'train.py' in calls[0][1]  # trained, never evaluated
