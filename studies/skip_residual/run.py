r"""Runs the pre-registered skip/residual study (PROTOCOL.md beside this file) and writes its tables.

  python studies/skip_residual/run.py                        # the CPU study: tables in results/
  python studies/skip_residual/run.py --config=studies/skip_residual/configs/gpu.py

Every stage resumes: a run that results/results.csv lists is read back from its row, never
trained again, so over the committed table the command trains nothing and rewrites the report.
"""

import pathlib
import shlex
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # `studies` and `resunet_jax` from a clone

from absl import flags  # noqa: E402

from resunet_jax import cli  # noqa: E402
from resunet_jax.ablation import runner  # noqa: E402
from studies.skip_residual import protocol  # noqa: E402

_CONFIG = cli.define_config_file('config', 'studies/skip_residual/configs/study.py', 'Study config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/skip_residual', 'Folder of the runs and checkpoints.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --workdir=runs/skip_residual')
  start = time.perf_counter()
  command = shlex.join(['python', 'studies/skip_residual/run.py', *sys.argv[1:]])
  try:
    protocol.run(_CONFIG.value, pathlib.Path(_WORKDIR.value), command=command)  # writes the tables itself
  except runner.Stopped as e:  # SIGTERM: exit 0 like train.py; the finished runs are kept
    print(e)
    return
  print(f'study in {_WORKDIR.value}, {(time.perf_counter() - start) / 60:.1f} min')
  for name, path in protocol.table_paths(protocol.output_dir(_CONFIG.value, _WORKDIR.value)).items():
    print(f'  {name:<16} {path}')


if __name__ == '__main__':
  cli.run(main)
