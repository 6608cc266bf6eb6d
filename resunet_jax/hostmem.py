"""Host-memory settings: huge pages for XLA's large CPU buffers, and returning setup memory.

XLA's CPU runtime allocates each step's temporary buffers anew and frees them at its end. glibc
serves blocks that large with a fresh `mmap`, so every step touches its ~100 MB of temporaries
as new 4 KiB pages: about 22,000 page faults per training step of the base-16 U-Net at batch 4,
128x128, a fifth of its time (benchmarks/README.md, "Page faults"). With glibc's tunable
`glibc.malloc.hugetlb=1` malloc asks for transparent huge pages (2 MiB) on those mappings,
which takes the faults to ~0 for 3-8% more peak memory. Keeping the freed memory instead
(mallopt: one arena, no mmap, no trimming) removes the faults too but fragments the heap: up to
1.7x the peak memory, measured and not kept.

glibc reads its tunables once, at process start, so `relaunch_with_huge_pages()` re-executes the
command with `GLIBC_TUNABLES` set (same process id, before any work). The command-line tools
call it (`cli.run`); importing the package changes nothing. `RESUNET_HUGE_PAGES=0` keeps glibc's
defaults; other C libraries, and glibc before 2.35 (which ignores the tunable), run unchanged.

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
import logging
import os
import pathlib
import platform
import sys

from resunet_jax import native

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


def relaunch_with_huge_pages() -> None:
  """Re-executes this Python command with `glibc.malloc.hugetlb=1`, unless it has it or is not glibc's.

  The relaunched command also preloads keep_blocks.c (unless `RESUNET_KEEP_BLOCKS=0` or it
  cannot be built) and, back here in it, runs JAX's CPU computations synchronously.

  Only a command started as `python SCRIPT ...` (or `-m`) whose `__main__` is that script is
  relaunched: a script run from another one (`runpy`) is left alone.
  """
  if enabled():
    if keeping_blocks():  # one step's temporaries freed before the next allocates its own
      import jax

      jax.config.update('jax_cpu_enable_async_dispatch', False)
    return
  if os.environ.get('RESUNET_HUGE_PAGES', '1') == '0' or platform.libc_ver()[0] != 'glibc':
    return
  main = getattr(sys.modules.get('__main__'), '__file__', None)
  started = [arg for arg in sys.orig_argv[1:] if not arg.startswith('-')][:1]
  if main is None or not started or os.path.abspath(started[0]) != os.path.abspath(main):
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
