"""The CPU process settings (`cpu.hostmem`): returned setup memory, the kept block, the relaunch and when it happens."""

import os
import platform
import subprocess
import sys

import pytest

from resunet_jax.cpu import hostmem

# Frees 200 MB of 100 KB blocks that small live blocks pin between them, so glibc cannot give
# them back by shrinking its heap; prints the resident MB before and after releasing them.
FRAGMENTED = """
from resunet_jax.cpu import hostmem

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


# Allocates, touches and frees a 64 MB block, then allocates and touches one again: prints
# whether the second is the first and the page faults that touching it took.
REUSE = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.calloc.restype, libc.calloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 2**20
if sys.argv[1] == 'on':
  libc.resunet_keep_blocks(1)
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident_mb():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * 4096 / MB
first = libc.malloc(64 * MB)
ctypes.memset(first, 1, 64 * MB)
libc.free(first)
before = faults()
second = libc.malloc(64 * MB)
ctypes.memset(second, 1, 64 * MB)
print(first == second, faults() - before)
libc.free(second)
zeroed = libc.calloc(64, MB)  # calloc never gets a kept (written) block
print(ctypes.string_at(zeroed, 64 * MB).count(0) == 64 * MB)
libc.free(zeroed)
before = resident_mb()  # the kept 64 MB block is resident
larger = libc.malloc(128 * MB)  # too small: the kept block is freed before this one is made
ctypes.memset(larger, 1, 128 * MB)
print(round(resident_mb() - before))
"""


def _keep_library_or_skip():
  if platform.libc_ver()[0] != 'glibc' or not sys.platform.startswith('linux'):
    pytest.skip('glibc on Linux only')
  library = hostmem._keep_library()
  if library is None:
    pytest.skip('no C compiler here')
  return library


def _reuse(library, switch):
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'} | {'LD_PRELOAD': str(library)}
  result = subprocess.run([sys.executable, '-c', REUSE, switch], capture_output=True, text=True, check=True, env=env)
  return result.stdout.split()


def test_a_freed_large_block_is_reused_with_its_pages_once_switched_on():
  library = _keep_library_or_skip()
  same, faults, zeroed, grown = _reuse(library, 'on')
  assert same == 'True'
  assert int(faults) < 100  # 16,384 pages of 4 KiB, all resident already
  assert zeroed == 'True'
  assert int(grown) < 100  # 128 MB made, the kept 64 MB freed: +64, not +128


def test_until_switched_on_every_large_block_is_new():
  library = _keep_library_or_skip()
  _, faults, zeroed, _ = _reuse(library, 'off')
  assert int(faults) > 10_000
  assert zeroed == 'True'


STATE = """
from resunet_jax.cpu import hostmem
hostmem.relaunch_for_cpu()
from jax._src import xla_bridge
print(hostmem.enabled(), hostmem.keeping_blocks(), xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)
"""


def _relaunched(tmp_path, **env):
  return _run_script(tmp_path, STATE, **env)[0]


def test_a_relaunched_command_keeps_blocks_and_dispatches_synchronously(tmp_path):
  _keep_library_or_skip()
  assert _relaunched(tmp_path) == ['True', 'True', 'False']


# Counts the releases of setup memory after an eager operation and after compiling a step-sized
# program, then prints whether the kept block was switched on by them.
COMPILES = """
import functools
from resunet_jax.cpu import hostmem
hostmem.relaunch_for_cpu()
import jax, jax.numpy as jnp
calls, release = [], hostmem.release_free_memory
hostmem.release_free_memory = lambda: calls.append(1) or release()
(jnp.ones(3) + 1).block_until_ready()
eager = len(calls)
step = jax.jit(lambda x: functools.reduce(lambda a, i: jnp.tanh(a @ a + i), range(300), x))
step(jnp.eye(8)).block_until_ready()
step(jnp.eye(8)).block_until_ready()  # compiled once
print(eager, len(calls), hostmem._keep_switch()(1))
"""


def test_a_relaunched_command_returns_setup_memory_after_each_compilation(tmp_path):
  _keep_library_or_skip()
  # The eager addition compiles in milliseconds: no release; the step once, and it switched keeping on.
  assert _run_script(tmp_path, COMPILES)[0] == ['0', '1', '1']


def test_keeping_blocks_can_be_switched_off(tmp_path):
  _keep_library_or_skip()
  assert _relaunched(tmp_path, RESUNET_KEEP_BLOCKS='0') == ['True', 'False', 'True']


def test_without_a_compiler_the_command_runs_with_huge_pages_only(tmp_path):
  if platform.libc_ver()[0] != 'glibc':
    pytest.skip('glibc only')
  cache = tmp_path / 'cache'
  assert _relaunched(tmp_path, CC='no-such-compiler', RESUNET_JAX_CACHE=str(cache)) == ['True', 'False', 'True']
  assert not cache.exists() or not list(cache.iterdir())


# Forks 300 times while a thread allocates and frees large blocks; each child does the same once.
FORKS = """
import ctypes, os, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.resunet_keep_blocks(1)
stop = False
def churn():
  while not stop:
    libc.free(libc.malloc(40 * 2**20))
threading.Thread(target=churn, daemon=True).start()
for _ in range(300):
  pid = os.fork()
  if pid == 0:
    libc.free(libc.malloc(40 * 2**20))
    os._exit(0)
  os.waitpid(pid, 0)
stop = True
print('ok')
"""


def test_a_child_forked_during_a_large_allocation_does_not_hang():
  library = _keep_library_or_skip()  # without fork handlers this hangs within the 300 forks
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'} | {'LD_PRELOAD': str(library)}
  result = subprocess.run([sys.executable, '-c', FORKS], capture_output=True, text=True, env=env, timeout=120)
  assert result.stdout.split() == ['ok']


# The environment a relaunch sets, and the switches it reads: each test starts without them,
# on the CPU platform (which a GPU host with JAX's CUDA plugin would not pick by itself).
_RELAUNCH_ENV = ('GLIBC_TUNABLES', 'RESUNET_HUGE_PAGES', 'RESUNET_KEEP_BLOCKS', 'LD_PRELOAD', 'JAX_PLATFORMS')


def _run_script(tmp_path, code, *interpreter_args, **env):
  """Runs `code` as a script (or, with `-m`, as the module `script`): its printed words and its process id."""
  script = tmp_path / 'script.py'
  script.write_text(code)
  environment = {k: v for k, v in os.environ.items() if k not in _RELAUNCH_ENV} | {'JAX_PLATFORMS': 'cpu'} | env
  environment['PYTHONPATH'] = os.pathsep.join([str(tmp_path), *sys.path])
  target = ['-m', 'script'] if '-m' in interpreter_args else [str(script)]
  args = [a for a in interpreter_args if a != '-m']
  process = subprocess.Popen(
    [sys.executable, *args, *target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
  )
  out, err = process.communicate()
  assert process.returncode == 0, err
  return out.split(), process.pid


RELAUNCH = """import os, sys
print('started')
from resunet_jax.cpu import hostmem
hostmem.relaunch_for_cpu()
print(hostmem.enabled(), os.getpid())
"""


def _glibc_or_skip():
  if platform.libc_ver()[0] != 'glibc':
    pytest.skip('glibc only')


@pytest.mark.parametrize('interpreter_args', [(), ('-m',), ('-W', 'ignore'), ('-W', 'ignore', '-m')])
def test_a_command_relaunches_itself_once_in_place_however_it_was_started(tmp_path, interpreter_args):
  _glibc_or_skip()
  lines, pid = _run_script(tmp_path, RELAUNCH, *interpreter_args)
  # Ran twice, the second time with the tunable, as the same process (exec, not a child).
  assert lines == ['started', 'started', 'True', str(pid)]


def test_huge_pages_can_be_switched_off(tmp_path):
  lines, pid = _run_script(tmp_path, RELAUNCH, RESUNET_HUGE_PAGES='0')
  assert lines == ['started', 'False', str(pid)]


@pytest.mark.parametrize('platforms', ['cuda', 'tpu,cpu'])
def test_a_run_on_an_accelerator_is_not_relaunched(tmp_path, platforms):
  _glibc_or_skip()
  assert _run_script(tmp_path, RELAUNCH, JAX_PLATFORMS=platforms)[0][:2] == ['started', 'False']


def test_a_script_run_from_another_is_not_relaunched(tmp_path):
  (tmp_path / 'inner.py').write_text(RELAUNCH)
  outer = f"import runpy; runpy.run_path({str(tmp_path / 'inner.py')!r}, run_name='__main__')"
  assert _run_script(tmp_path, outer)[0][:2] == ['started', 'False']


def test_the_platform_is_judged_from_the_environment_and_the_installed_plugins(monkeypatch):
  monkeypatch.delenv('JAX_PLATFORM_NAME', raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert hostmem.platform_is_cpu()
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert not hostmem.platform_is_cpu()
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.setattr(hostmem.importlib.metadata, 'entry_points', lambda group: ['jax_cuda12_plugin'])
  assert not hostmem.platform_is_cpu()
  monkeypatch.setattr(hostmem.importlib.metadata, 'entry_points', lambda group: [])
  monkeypatch.setattr(hostmem.importlib.util, 'find_spec', lambda name: None)
  assert hostmem.platform_is_cpu()
