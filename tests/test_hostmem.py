"""Returning freed host memory after setup (`hostmem.release_free_memory`)."""

import os
import platform
import subprocess
import sys

import pytest

from resunet_jax import hostmem

# Frees 200 MB of 100 KB blocks that small live blocks pin between them, so glibc cannot give
# them back by shrinking its heap; prints the resident MB before and after releasing them.
FRAGMENTED = """
from resunet_jax import hostmem

def resident_mb():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * 4096 / 2**20

blocks, pins = [], []
for _ in range(2000):
  blocks.append(bytearray(b'x' * 100_000))
  pins.append(bytearray(b'y' * 1_000))
blocks.clear()
before = resident_mb()
released = hostmem.release_free_memory()
print(released, before, resident_mb())
"""


def test_release_returns_freed_blocks_to_the_system():
  if platform.libc_ver()[0] != 'glibc' or not sys.platform.startswith('linux'):
    pytest.skip('glibc on Linux only')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  result = subprocess.run([sys.executable, '-c', FRAGMENTED], capture_output=True, text=True, check=True, env=env)
  released, before, after = result.stdout.split()
  assert released == 'True'
  assert float(before) - float(after) > 150  # of the 200 MB freed


def test_release_is_a_no_op_without_glibc(monkeypatch):
  monkeypatch.setattr(platform, 'libc_ver', lambda: ('', ''))
  hostmem._libc.cache_clear()
  try:
    assert hostmem.release_free_memory() is False
  finally:
    hostmem._libc.cache_clear()
