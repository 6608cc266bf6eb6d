"""Process settings of a run on CPU: huge pages for XLA's large host buffers, a kept block, setup memory returned.

This docstring is the one place that describes them. They apply to a command-line run whose
JAX platform is the CPU (`relaunch_for_cpu`, which each tool calls first, before its heavy
imports, through `cli.relaunch_for_cpu`; `cli.run` calls it too): every way
of starting a tool (`python X.py`, `python -m X`, with interpreter flags) relaunches the same
command once. A run that will use an accelerator (`JAX_PLATFORMS` naming another platform
first, or, with none named, a JAX plugin for a GPU or TPU installed) starts unchanged, and so
does any process that is not a tool (importing the package changes nothing).
`RESUNET_HUGE_PAGES=0` switches all of it off, `RESUNET_KEEP_BLOCKS=0` the kept block alone.

XLA's CPU runtime allocates each step's temporary buffers anew and frees them at its end. glibc
serves blocks that large with a fresh `mmap`, so every step touches its ~100 MB of temporaries
as new 4 KiB pages: about 22,000 page faults per training step of the base-16 U-Net at batch 4,
128x128, a fifth of its time (benchmarks/README.md, "Page faults"). With glibc's tunable
`glibc.malloc.hugetlb=1` malloc asks for transparent huge pages (2 MiB) on those mappings,
which takes the faults to ~0 for 3-8% more peak memory. Keeping the freed memory instead
(mallopt: one arena, no mmap, no trimming) removes the faults too but fragments the heap: up to
1.7x the peak memory, measured and not kept.

glibc reads its tunables once, at process start, so `relaunch_for_cpu()` re-executes the
command with `GLIBC_TUNABLES` set (same process id, before any work). Other C libraries, and
glibc before 2.35 (which ignores the tunable), run unchanged.

Huge pages make the faults few, but each step's temporaries are still new pages that the
kernel zeroes (4.3% of U-Net base 64's time). The relaunch therefore also preloads
`keep_blocks.c` (compiled on first use with `$CC`, else gcc, by `native.compile_library`), which
keeps one freed block of 32 MiB or more for the next such allocation once switched on, and
runs JAX's CPU computations synchronously (`jax_cpu_enable_async_dispatch=False`), so that one
step's temporaries are freed before the next step allocates its own and take the kept pages:
U-Net base 64 training 2.07-2.11 -> 2.30-2.39 images/s, ResUNet base 16 26.5-28.0 -> 28.5-29.3.
`RESUNET_KEEP_BLOCKS=0` leaves it out (huge pages only); without a C compiler it is left out.

Compiling and initialising a model frees a lot of small blocks that glibc keeps for reuse
rather than returning them, and a training step allocates its temporaries on top of them:
`release_free_memory()` (glibc's `malloc_trim(0)`), called once after the first compile, takes
the peak memory of U-Net base 64 training down by about 145 MB (benchmarks/README.md). It also
switches the kept block on: keeping blocks during setup would hold the initialiser's
temporaries through compiling.
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
  computations synchronously. Nothing happens with `RESUNET_HUGE_PAGES=0`, a C library other
  than glibc, an accelerator platform, or a `__main__` the interpreter was not started with.
  """
  if enabled():
    if keeping_blocks():  # one step's temporaries freed before the next allocates its own
      import jax

      jax.config.update('jax_cpu_enable_async_dispatch', False)
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


@functools.cache
def _libc():
  if platform.libc_ver()[0] != 'glibc':
    return None
  return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')


def release_free_memory() -> bool:
  """Returns the C heap's free memory to the system (glibc's `malloc_trim(0)`); False elsewhere.

  Then, where keep_blocks.c is loaded, switches on keeping a freed large block for reuse.

  Takes milliseconds; meant for once after setup (compiling, initialising, restoring), not for
  every step.
  """
  libc = _libc()
  if libc is None:
    return False
  libc.malloc_trim(0)
  if keeping_blocks():
    _keep_switch()(1)
  return True
