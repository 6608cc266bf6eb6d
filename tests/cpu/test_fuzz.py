"""The CPU layer set against the stock one on drawn shapes (tests/cpu/fuzz_layers.py), and a oneDNN
call made on one thread and run from others, with the AVX2 kernels forced."""

import os
import subprocess
import sys

import pytest

from resunet_jax.cpu import onednn

# Skipped only without the `cpu` extra: with its wheels installed, a failed build or load fails the tests.
pytestmark = pytest.mark.skipif(not onednn.installed(), reason='the cpu extra is not installed')

sys.path.insert(0, os.path.dirname(__file__))
import fuzz_layers  # noqa: E402


def test_a_seeded_sample_of_drawn_layer_calls_matches_the_stock_set():
  summary = fuzz_layers.run(cases=8, seed=11)
  assert summary['failed'] == 0, summary['failures']
  assert sum(summary['per_slot'].values()) == 8


def test_a_kernel_gradient_made_on_one_thread_runs_from_others_with_the_avx2_kernels():
  # On AVX2 a 3x3 kernel gradient of a 2x2 map is oneDNN's gemm (im2col) kernel; with oneDNN's own
  # scratchpad, which belongs to the thread that executes, running it from a thread other than the
  # creating one crashed (SIGSEGV) every time. The primitives now take the caller's scratchpad.
  script = """
import threading, numpy as np, jax.numpy as jnp, jax
from resunet_jax.cpu import onednn
x, dy = jnp.ones((4, 2, 2, 16)), jnp.ones((4, 2, 2, 32))
f = jax.jit(lambda x, dy: onednn.kernel_gradient(x, dy, (3, 3, 16, 32)))
ref = np.asarray(f(x, dy))
same = []
def work():
  same.extend(np.array_equal(np.asarray(f(x, dy)), ref) for _ in range(20))
threads = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print(sum(same), len(same), float(ref[1, 1, 0, 0]))
"""
  env = {**os.environ, 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['60', '60', '16.0']  # centre tap: 4 images x 2x2 positions x 1 x 1
