"""The project's commands for tests, started from one preloaded interpreter instead of a new one each time.

A new `python experiments/train.py ...` spends several seconds importing JAX, Flax, Orbax, TFDS
and Grain before it does anything; the suite starts about 150 such commands. `Commands` starts
one server process per pytest worker that imports them once, then forks a child for each command:
the child takes the command's environment, working directory and output files and runs the script
as `__main__` (`runpy`), as `python SCRIPT ARGS` would. JAX's backends are never started in the
server, so each child initialises its own devices from its own `XLA_FLAGS` (fake device counts,
`jax.distributed`), and a kill, a signal or an exit status reaches the test as from a subprocess.

What a fork cannot imitate goes to a real subprocess: an environment that changes a variable read
at import time (`JAX_*`, `PYTHON*`, `LD_*`, `GLIBC_TUNABLES`, the relaunch switches), and any
command that is not a Python script. Tests of the relaunch itself start real processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every program of the suite compiles with LLVM's optimiser off: compilation dominates the suite (a
# tiny U-Net's train step compiles in about half the time), and what a test compares is compiled
# the same way on both sides. Added to each command's XLA_FLAGS (`fast_compile`) and, by conftest,
# to the workers'.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def fast_compile(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) with `FAST_COMPILE` added."""
  return flags if FAST_COMPILE in flags else f'{flags} {FAST_COMPILE}'.strip()


# Read when a module is imported (or the interpreter starts), so they must match the server's.
_IMPORT_TIME = ('JAX_', 'PYTHON', 'LD_', 'GLIBC_TUNABLES', 'RESUNET_HUGE_PAGES', 'RESUNET_KEEP_BLOCKS', 'TF_')
_PRELOAD = (
  'jax',
  'flax.linen',
  'optax',
  'orbax.checkpoint',
  'tensorflow_datasets',
  'grain',
  'matplotlib.pyplot',
  'PIL.Image',
  'tqdm',
  'resunet_jax.cli',
  'resunet_jax.ablation',
  'resunet_jax.training.evaluation',
  'resunet_jax.inference',
  'resunet_jax.training.loop',
  'resunet_jax.training.restore',
)


class Handle:
  """One started command: `pid`, `poll()`, `wait()`, `send_signal()`, `kill()`, `communicate()` (a Popen's subset)."""

  def __init__(self, pid: int, outputs: tuple[pathlib.Path, pathlib.Path], done: threading.Event, status: list):
    self.pid, self._outputs, self._done, self._status = pid, outputs, done, status

  @property
  def returncode(self) -> int | None:
    return self._status[0] if self._done.is_set() else None

  def poll(self) -> int | None:
    return self.returncode

  def wait(self, timeout: float | None = None) -> int:
    if not self._done.wait(timeout):
      raise subprocess.TimeoutExpired(str(self.pid), timeout)
    return self._status[0]

  def send_signal(self, sig: int) -> None:
    if not self._done.is_set():
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def output(self) -> tuple[str, str]:
    return tuple(path.read_text(errors='replace') for path in self._outputs)

  def communicate(self, timeout: float | None = None) -> tuple[str, str]:
    try:
      self.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      self.wait()
      raise
    return self.output()


class _Subprocess(Handle):
  """A real subprocess behind the same interface (for what a fork cannot imitate)."""

  def __init__(self, argv, env, cwd, outputs):
    out, err = (path.open('w') for path in outputs)
    self._process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    out.close()
    err.close()
    done, status = threading.Event(), [None]

    def reap():
      status[0] = self._process.wait()
      done.set()

    threading.Thread(target=reap, daemon=True).start()
    super().__init__(self._process.pid, outputs, done, status)


class Commands:
  """Starts the project's commands; one per pytest worker (the `commands` fixture)."""

  def __init__(self, scratch: pathlib.Path, env: dict[str, str] | None = None):
    self._scratch = scratch
    self._env = dict(os.environ if env is None else env)
    self._server = None
    self._lock = threading.Lock()
    self._waiting: dict[int, tuple[threading.Event, list]] = {}
    self._started: dict[int, threading.Event] = {}
    self._pids: dict[int, int] = {}
    self._count = 0

  def _start_server(self):
    self._server = subprocess.Popen(
      [sys.executable, __file__],
      cwd=ROOT,
      env=self._env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      bufsize=1,
    )
    threading.Thread(target=self._read_replies, daemon=True).start()

  def _read_replies(self):
    for line in self._server.stdout:
      reply = json.loads(line)
      with self._lock:
        if 'pid' in reply:
          self._pids[reply['id']] = reply['pid']
          self._started[reply['id']].set()
        else:
          done, status = self._waiting.pop(reply['id'])
          status[0] = reply['status']
          done.set()
    with self._lock:  # the server is gone: nothing more will finish
      for done, status in self._waiting.values():
        status[0] = -signal.SIGKILL
        done.set()
      for event in self._started.values():
        event.set()

  def _forkable(self, argv, env) -> bool:
    if len(argv) < 2 or argv[0] != sys.executable or argv[1].startswith('-') or not argv[1].endswith('.py'):
      return False
    names = set(env) | set(self._env)
    return all(env.get(n) == self._env.get(n) for n in names if n.startswith(_IMPORT_TIME))

  def start(self, argv, env=None, cwd=ROOT) -> Handle:
    """Starts `argv` (`[sys.executable, SCRIPT, *ARGS]` is forked; anything else is a subprocess)."""
    env = dict(os.environ if env is None else env)
    env['XLA_FLAGS'] = fast_compile(env.get('XLA_FLAGS', ''))
    argv = [str(a) for a in argv]
    with self._lock:
      self._count += 1
      number = self._count
    outputs = tuple(
      pathlib.Path(tempfile.mkstemp(prefix=f'command{number}-', suffix=s, dir=self._scratch)[1])
      for s in ('.out', '.err')
    )
    if not self._forkable(argv, env):
      return _Subprocess(argv, env, cwd, outputs)
    with self._lock:
      if self._server is None or self._server.poll() is not None:
        self._start_server()
      done, status, started = threading.Event(), [None], threading.Event()
      self._waiting[number], self._started[number] = (done, status), started
      request = {'id': number, 'argv': argv[1:], 'env': env, 'cwd': str(cwd), 'outputs': [str(p) for p in outputs]}
      self._server.stdin.write(json.dumps(request) + '\n')
      self._server.stdin.flush()
    started.wait()
    return Handle(self._pids.get(number, -1), outputs, done, status)

  def run(self, argv, env=None, cwd=ROOT, timeout: float | None = 600) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True)`, killed and raising `TimeoutExpired` after `timeout`."""
    handle = self.start(argv, env, cwd)
    stdout, stderr = handle.communicate(timeout)
    return subprocess.CompletedProcess(argv, handle.returncode, stdout, stderr)

  def close(self):
    if self._server is not None:
      self._server.stdin.close()
      self._server.wait(timeout=60)


# The server (run as a script): preload, then fork one child per request line on stdin.


def _child(request, pipes: tuple[int, int], inherited: list[int]) -> None:
  """In the forked child: become the command, run it, exit with its status (never returns).

  `pipes`: the write ends of its stdout and stderr (the server copies them into the output
  files: a pipe, as for a subprocess, so a file-size limit the command sets binds only its own
  files); `inherited`: the server's descriptors, closed here.
  """
  status = 1
  try:
    for fd in inherited:  # the reply pipe and other commands' pipes: they must close when their owners end
      os.close(fd)
    os.setpgid(0, 0)  # its own group, as a separate process would be for the signals it gets
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, pipe in zip((1, 2), pipes, strict=True):
      os.dup2(pipe, fd)
      os.close(pipe)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's own streams)
    sys.stdout = open(1, 'w', buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, 'w', buffering=1, closefd=False)  # noqa: SIM115
    script = request['argv'][0]
    sys.argv = list(request['argv'])
    sys.orig_argv = [sys.executable, *request['argv']]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    import runpy

    try:
      runpy.run_path(script, run_name='__main__')
      status = 0
    except SystemExit as e:
      code = e.code
      status = code if isinstance(code, int) else (0 if code is None else 1)
      if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (as the interpreter does: the traceback, status 1)
      import traceback

      traceback.print_exc()
      status = 1
    import atexit
    import threading as child_threading

    child_threading._shutdown()  # as the interpreter ends: its exit hooks (thread pools), then non-daemon threads

    atexit._run_exitfuncs()
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(status)


def _serve() -> None:
  import importlib

  out = os.dup(1)  # replies only: anything an import prints goes to stderr
  os.dup2(2, 1)
  import logging

  handlers = list(logging.root.handlers)
  for name in _PRELOAD:
    importlib.import_module(name)
  logging.root.handlers[:] = handlers  # a warning logged while importing adds a default handler; a new process has none
  children: dict[int, int] = {}  # pid -> request id, until it has exited
  relays: dict[int, tuple[int, object]] = {}  # a child's pipe (read end) -> (request id, output file)
  exited: dict[int, int] = {}  # request id -> exit status, reported once its pipes are drained
  pending, open_input = b'', True
  while open_input or children or exited:
    watched = ([0] if open_input else []) + list(relays)
    ready, _, _ = select.select(watched, [], [], 0.02)
    for fd in ready:
      if fd == 0:
        chunk = os.read(0, 1 << 16)
        open_input = bool(chunk)
        pending += chunk
        continue
      chunk = os.read(fd, 1 << 16)
      number, file = relays[fd]
      if chunk:
        file.write(chunk)
        file.flush()
      else:
        file.close()
        os.close(fd)
        del relays[fd]
    while b'\n' in pending:
      line, pending = pending.split(b'\n', 1)
      request = json.loads(line)
      out_pipe, err_pipe = os.pipe(), os.pipe()
      pid = os.fork()
      if pid == 0:
        _child(request, (out_pipe[1], err_pipe[1]), [out, *relays, out_pipe[0], err_pipe[0]])
      os.close(out_pipe[1])
      os.close(err_pipe[1])
      for pipe, path in zip((out_pipe[0], err_pipe[0]), request['outputs'], strict=True):
        relays[pipe] = (request['id'], open(path, 'wb'))  # noqa: SIM115 (closed at the pipe's end)
      children[pid] = request['id']
      os.write(out, (json.dumps({'id': request['id'], 'pid': pid}) + '\n').encode())
    while children:
      try:
        pid, wait_status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if pid == 0:
        break
      number = children.pop(pid, None)
      if number is not None:
        exited[number] = os.waitstatus_to_exitcode(wait_status)
    for number in [n for n in exited if all(owner != n for owner, _ in relays.values())]:
      os.write(out, (json.dumps({'id': number, 'status': exited.pop(number)}) + '\n').encode())


if __name__ == '__main__':
  _serve()
