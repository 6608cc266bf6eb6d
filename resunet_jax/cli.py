"""Command-line plumbing shared by `experiments/*.py`: flag parsing, one-line errors, configs.

Experiments stay thin: they define their flags, then call `run(main)`. A mistake in the
command line or the config (unknown key, wrong type, unknown preset) ends the process with a
one-line `error: ...` on stderr and exit status 2, not a traceback (`-v 1` adds it).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from resunet_jax.cpu import hostmem
from resunet_jax.errors import PeerLostError, UserError

__all__ = ['UserError', 'define_config_file', 'parse_flags', 'run']


def _one_line(error: BaseException) -> str:
  # ml_collections wraps a KeyError (whose str() is a repr) in an AttributeError.
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return ' '.join(str(text).split())


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)
_CONFIG_FLAGS: list[flags.FlagHolder] = []


def _exit_with(error: BaseException) -> None:
  sys.stderr.write(f'error: {_one_line(error)}\n')
  if isinstance(error, PeerLostError):  # no exit hooks: they would wait for the dead peer
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
  sys.exit(2)


def define_config_file(name: str, default: str, help_string: str) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file` that reports bad `--NAME.a.b=v` overrides in one line.

  ml_collections resolves override flags found in `sys.argv` while the flag is defined, so a
  mistyped key (e.g. `--config.model.base_widht=16`) fails here, with its suggestion.
  """
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string)
  except _FLAG_ERRORS as e:
    _exit_with(e)
  _CONFIG_FLAGS.append(holder)
  return holder


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flags parser that reports bad flags and config values in one line."""
  try:
    remaining = flags.FLAGS(argv)
    for holder in _CONFIG_FLAGS:
      holder.value.to_dict()  # Config files load lazily: surface a missing or broken file now.
    return remaining
  except _FLAG_ERRORS as e:
    _exit_with(e)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with one-line errors for `UserError` and bad flags.

  The one place where a command's process is set up: on CPU it first relaunches itself with
  the CPU process settings (`resunet_jax.cpu.hostmem`, where they are described). The relaunch
  comes after the tool's imports, which it repeats (about 2 s; benchmarks/README.md, "The CPU backend").
  """
  hostmem.relaunch_for_cpu()

  def wrapped(argv):
    if not flags.FLAGS['verbosity'].present:  # Library chatter only on request (-v 0).
      logging.set_verbosity(logging.WARNING)
      # TFDS warns about its folders and recommends OpenCV; our errors say what matters.
      logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= std_logging.ERROR or 'tensorflow_datasets' not in record.pathname
      )
    try:
      return main(argv)
    except UserError as e:
      if flags.FLAGS['verbosity'].present:  # -v 1 (--verbosity=1): where it was raised, too
        traceback.print_exc()
      _exit_with(e)

  app.run(wrapped, flags_parser=parse_flags)
