r"""Trains a grid of skip/residual ablations over seeds and writes a report with verdicts.

  python experiments/ablate.py                                    # the default CPU-sized grid
  python experiments/ablate.py --config=experiments/configs/ablate_quick.py --workdir=runs/ablate-quick
  python experiments/ablate.py --config=experiments/configs/ablate_depth.py   # claim 4: depth 2..6
  python experiments/ablate.py --config.ablation.seeds=5 --config.train.num_steps=600

The pre-registered studies have commands of their own (studies/*/run.py).

Every run lives in WORKDIR/runs/<hash of its resolved config>/; a finished one is read back,
not trained again, so re-running a finished sweep only rewrites the report and an
interrupted sweep resumes. Writes WORKDIR/results.csv, knockouts.csv, report.md and figures.
"""

import pathlib
import shlex
import sys
import time

import claims  # experiments/claims.py
from absl import flags

from resunet_jax import ablation, cli

_CONFIG = cli.define_config_file('config', 'experiments/configs/ablate.py', 'Ablation config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep folder; default runs/<config file name>.')


def main(argv: list[str]) -> None:
  try:
    _main(argv)
  except ablation.runner.Stopped as e:  # SIGTERM: exit 0 like train.py; the finished runs are kept
    print(e)


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --workdir=runs/ablate')
  config = _CONFIG.value
  workdir = pathlib.Path(
    _WORKDIR.value or pathlib.Path('runs') / pathlib.Path(flags.FLAGS['config'].config_filename).stem
  )
  start = time.perf_counter()
  command = shlex.join(['python', 'experiments/ablate.py', *sys.argv[1:]])
  results = ablation.sweep(config, workdir)
  output = pathlib.Path(config.ablation.get('output') or workdir)
  output.mkdir(parents=True, exist_ok=True)
  studies, target = ablation.report.group(results), config.ablation.target_dice
  verdicts = claims.section(studies, target)
  paths = ablation.report.write(results, output, target=target, command=command, verdicts=verdicts)
  print(f'{len(results)} runs in {workdir}, {(time.perf_counter() - start) / 60:.1f} min')
  for name, path in paths.items():
    print(f'  {name:<16} {path}')
  print('\n'.join(claims.claim_verdicts(studies, target)))


if __name__ == '__main__':
  cli.run(main)
