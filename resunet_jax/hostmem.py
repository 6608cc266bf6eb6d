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

Compiling and initialising a model frees a lot of small blocks that glibc keeps for reuse
rather than returning them, and a training step allocates its temporaries on top of them:
`release_free_memory()` (glibc's `malloc_trim(0)`), called once after the first compile, takes
the peak memory of U-Net base 64 training down by about 145 MB (benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'


def enabled() -> bool:
  """Whether this process runs with the tunable set."""
  return f'{TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', '')


def relaunch_with_huge_pages() -> None:
  """Re-executes this Python command with `glibc.malloc.hugetlb=1`, unless it has it or is not glibc's.

  Only a command started as `python SCRIPT ...` (or `-m`) whose `__main__` is that script is
  relaunched: a script run from another one (`runpy`) is left alone.
  """
  if enabled() or os.environ.get('RESUNET_HUGE_PAGES', '1') == '0' or platform.libc_ver()[0] != 'glibc':
    return
  main = getattr(sys.modules.get('__main__'), '__file__', None)
  started = [arg for arg in sys.orig_argv[1:] if not arg.startswith('-')][:1]
  if main is None or not started or os.path.abspath(started[0]) != os.path.abspath(main):
    return
  tunables = os.environ.get('GLIBC_TUNABLES')
  os.environ['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'
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

  Takes milliseconds; meant for once after setup (compiling, initialising, restoring), not for
  every step.
  """
  libc = _libc()
  if libc is None:
    return False
  libc.malloc_trim(0)
  return True
