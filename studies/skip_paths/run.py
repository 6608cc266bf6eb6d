r"""Runs the pre-registered skip-path study (PROTOCOL.md beside this file) and writes its report.

  python studies/skip_paths/run.py            # 30 runs; results/ beside this file

A sweep (`resunet_jax.ablation.sweep`): every run lives in WORKDIR/runs/<hash of its config>/, a
finished one is read back, so rerunning resumes and, when all are done, only rewrites the report,
whose verdict section is this study's seven endpoints (`endpoints.section`).
"""

import pathlib
import shlex
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # `studies` and `resunet_jax` from a clone

from absl import flags  # noqa: E402

from resunet_jax import ablation, cli  # noqa: E402
from studies.skip_paths import endpoints  # noqa: E402

_CONFIG = cli.define_config_file('config', 'studies/skip_paths/config.py', 'Study config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/skip_paths', 'Folder of the runs and checkpoints.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --workdir=runs/skip_paths')
  config = _CONFIG.value
  try:
    results = ablation.sweep(config, _WORKDIR.value)
  except ablation.runner.Stopped as e:  # SIGTERM: exit 0 like train.py; the finished runs are kept
    print(e)
    return
  output = pathlib.Path(config.ablation.output or _WORKDIR.value)
  output.mkdir(parents=True, exist_ok=True)
  verdicts = endpoints.section(ablation.report.group(results))
  command = shlex.join(['python', 'studies/skip_paths/run.py', *sys.argv[1:]])
  paths = ablation.report.write(results, output, target=config.ablation.target_dice, command=command, verdicts=verdicts)
  for name, path in paths.items():
    print(f'  {name:<16} {path}')
  print('\n'.join(verdicts))


if __name__ == '__main__':
  cli.run(main)
