"""Process settings of a run on CPU: huge pages for XLA's large host buffers, a kept block, setup memory returned.

They apply to a command-line run whose JAX platform is the CPU, set up in one place:
`relaunch_for_cpu` (called by `cli.run`) re-executes the command once, same process id, with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc reads tunables only at start; 2.35 and later) and
`keep_blocks.c` preloaded; in the relaunched process it runs JAX's CPU computations
synchronously and, after each compilation of 0.1 s or more, returns what compiling freed
(`release_free_memory`, glibc's `malloc_trim(0)`) and switches the kept block on. A run on an
accelerator, a process that is not a tool, another C library, `RESUNET_HUGE_PAGES=0` (all of it
off) and `RESUNET_KEEP_BLOCKS=0` (the kept block off) start unchanged.

Why: XLA's CPU runtime allocates each step's large temporaries anew, and glibc serves them with
fresh `mmap`s whose 4 KiB pages fault and are zeroed every step. Huge pages take the faults to
about zero; the kept block (one freed block of 32 MiB or more, reused by the next allocation of
that size) avoids the zeroing; synchronous dispatch frees one step's temporaries before the next
allocates. The measured effects, and what was tried and dropped (`mallopt`, which fragments the
heap), are in benchmarks/README.md ("Page faults" and the CPU table).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import platform
import sys

from resunet_jax.cpu import native

TUNABLE = 'glibc.malloc.hugetlb'
KEEP_SOURCE = pathlib.Path(__file__).with_name('keep_blocks.c')


def enabled() -> bool:
  """Whether this process runs with the tunable set."""
  return f'{TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', '')


def _keep_library() -> pathlib.Path | None:
  """keep_blocks.c built, or None (switched off, not Linux, or no C compiler: logged)."""
  if os.environ.get('RESUNET_KEEP_BLOCKS', '1') == '0' or not sys.platform.startswith('linux'):
    return None
  try:
    return native.compile_library(KEEP_SOURCE, os.environ.get('CC') or 'gcc', ['-lpthread'])
  except native.BuildError as e:
    logging.info('Freed large blocks are not kept for reuse: %s', e)
    return None


def keeping_blocks() -> bool:
  """Whether keep_blocks.c is loaded in this process (preloaded by the relaunch)."""
  return _keep_switch() is not None


@functools.cache
def _keep_switch():
  return getattr(ctypes.CDLL(None), 'resunet_keep_blocks', None)


def platform_is_cpu() -> bool:
  """Whether JAX will run this process on the CPU, judged before JAX is imported.

  `JAX_PLATFORMS` (or `JAX_PLATFORM_NAME`) decides when set; otherwise JAX takes an accelerator
  whenever a plugin for one is installed (a `jax_plugins` entry point, or libtpu).
  """
  forced = os.environ.get('JAX_PLATFORMS') or os.environ.get('JAX_PLATFORM_NAME')
  if forced:
    return forced.split(',')[0].strip().lower() == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return importlib.util.find_spec('libtpu') is None


def _started_as_main() -> bool:
  """Whether `__main__` is what the interpreter was started with: `python [options] SCRIPT` or `-m MODULE`.

  A script run from another one (`runpy`) is not: relaunching would run the outer command again.
  """
  main = sys.modules.get('__main__')
  argv = sys.orig_argv[1:]
  for i, arg in enumerate(argv):
    if arg == '-m' or (arg.startswith('-m') and not arg.startswith('--')):
      module = arg[2:] or (argv[i + 1] if i + 1 < len(argv) else '')
      spec = getattr(main, '__spec__', None)
      return spec is not None and spec.name == module
  path = getattr(main, '__file__', None)
  return path is not None and any(os.path.abspath(arg) == os.path.abspath(path) for arg in argv if arg[:1] != '-')


def relaunch_for_cpu() -> None:
  """Re-executes this command once with the CPU settings, when it is a tool started as such that runs on CPU.

  The relaunched command has `glibc.malloc.hugetlb=1`, preloads keep_blocks.c (unless
  `RESUNET_KEEP_BLOCKS=0` or it cannot be built) and, back here in it, runs JAX's CPU
  computations synchronously, and returns setup memory after each compilation (`_after_compile`).
  Nothing happens with `RESUNET_HUGE_PAGES=0`, a C library other
  than glibc, an accelerator platform, or a `__main__` the interpreter was not started with.
  """
  if enabled():
    import jax

    if keeping_blocks():  # one step's temporaries freed before the next allocates its own
      jax.config.update('jax_cpu_enable_async_dispatch', False)
    _listen_for_compilations()
    return
  if os.environ.get('RESUNET_HUGE_PAGES', '1') == '0' or platform.libc_ver()[0] != 'glibc':
    return
  if not platform_is_cpu() or not _started_as_main():
    return
  tunables = os.environ.get('GLIBC_TUNABLES')
  os.environ['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'
  keep = _keep_library()
  if keep is not None and not any(c in str(keep) for c in ' :'):  # LD_PRELOAD's separators
    preload = os.environ.get('LD_PRELOAD')
    os.environ['LD_PRELOAD'] = f'{keep}:{preload}' if preload else str(keep)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # jax._src.dispatch.BACKEND_COMPILE_EVENT
SETUP_COMPILE_S = 0.1  # a step function's compilation, not an eager operation's


@functools.cache  # once per process
def _listen_for_compilations() -> None:
  import jax

  jax.monitoring.register_event_duration_secs_listener(_after_compile)


def _after_compile(event: str, duration: float, **kwargs) -> None:
  """JAX monitoring listener: `release_free_memory` after a compilation of `SETUP_COMPILE_S` or more."""
  del kwargs
  if event == COMPILE_EVENT and duration >= SETUP_COMPILE_S:
    release_free_memory()


@functools.cache
def _libc():
  if platform.libc_ver()[0] != 'glibc':
    return None
  return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')


def release_free_memory() -> bool:
  """Returns the C heap's free memory to the system (glibc's `malloc_trim(0)`); False elsewhere.

  Then, where keep_blocks.c is loaded, switches on keeping a freed large block for reuse.

  Takes milliseconds; meant for after setup (compiling, initialising, restoring), not for
  every step.
  """
  libc = _libc()
  if libc is None:
    return False
  libc.malloc_trim(0)
  if keeping_blocks():
    _keep_switch()(1)
  return True
