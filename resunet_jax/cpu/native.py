"""Small native libraries of this package, compiled on first use into a per-user cache.

`compile_library` builds one shared library from one source file with the machine's compiler
into `$RESUNET_JAX_CACHE` (default ~/.cache/resunet_jax), named by a hash of the source and
whatever else the caller says the build depends on, so a changed source or dependency builds
anew and an unchanged one is reused. Used for the oneDNN convolutions
(`resunet_jax.cpu.onednn`) and the kept host blocks (`resunet_jax.cpu.hostmem`). Imports
nothing heavy: `hostmem` builds its library before a command relaunches itself.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile


class BuildError(RuntimeError):
  """A native library could not be compiled here; the message says why in one line."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('RESUNET_JAX_CACHE') or pathlib.Path.home() / '.cache' / 'resunet_jax')


def compile_library(source: pathlib.Path, compiler: str, flags: list[str], depends_on: bytes = b'') -> pathlib.Path:
  """`compiler -shared -fPIC flags... source -o <cached .so>` unless that library exists; returns its path.

  `flags` go after the source too, so they may name libraries to link. Raises `BuildError`
  for a compiler that is not on PATH or that fails (with its first error line).
  """
  key = hashlib.sha256(source.read_bytes() + depends_on + ' '.join(flags).encode()).hexdigest()[:12]
  target = cache_dir() / f'{source.stem}-{key}.so'
  if target.exists():
    return target
  language = 'C++' if source.suffix in ('.cc', '.cpp') else 'C'
  if shutil.which(compiler) is None:
    raise BuildError(f"{source.name} is compiled on first use, but no {language} compiler '{compiler}' is on PATH")
  target.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a temporary name and rename: processes that build at once never load half a file.
  with tempfile.NamedTemporaryFile(dir=target.parent, suffix='.so', delete=False) as tmp:
    partial = pathlib.Path(tmp.name)
  command = [compiler, '-O2', '-shared', '-fPIC', str(source), '-o', str(partial), *flags]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    partial.unlink(missing_ok=True)
    lines = result.stderr.strip().splitlines() or ['(no output)']
    first_error = next((line for line in lines if 'error' in line), lines[-1])
    raise BuildError(f'compiling {source.name} failed ({compiler}): {first_error.strip()}')
  os.replace(partial, target)
  return target
