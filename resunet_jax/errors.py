"""Exceptions for mistakes in the user's input, reported by the CLIs as one line."""


class UserError(ValueError):
  """A wrong config value, path or file: the message says what is wrong and what to do."""


class DataError(UserError):
  """A dataset that is missing, unprepared, or whose files do not match what the config says."""


class PeerLostError(UserError):
  """A multi-process run lost a peer. The process exits at once: JAX's exit-time shutdown
  barrier would otherwise wait for the dead peer until its heartbeat times out, then abort."""


def suggest(name: str, valid) -> str:
  """ " (did you mean 'x'?)" for the closest of `valid`, or ''."""
  import difflib

  close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
  return f" (did you mean '{close[0]}'?)" if close else ''
