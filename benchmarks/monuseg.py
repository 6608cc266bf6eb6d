r"""The MoNuSeg table: test Dice and IoU of four presets under two protocols, several seeds each.

  MONUSEG_DIR=PATH python benchmarks/monuseg.py                        # the whole table, resuming
  MONUSEG_DIR=PATH python benchmarks/monuseg.py --protocols=paper --presets=unet --seeds=0 --steps=100
  python benchmarks/monuseg.py --table-only                            # print the table of the CSV

Every run is `experiments/train.py --config=experiments/configs/monuseg.py:<protocol>` (the
protocol's recipe; `--steps` and `--base-width` override it) in its own folder under `--root`,
then `experiments/evaluate.py --split=test` on the best checkpoint by validation Dice (the paper's
early stopping). Each finished run appends one row to `--csv` (protocol, preset, seed, steps,
width, best step, test Dice and IoU as means of the per-image values, minutes, CPU), so an
interrupted sweep resumes: rows already in the CSV are skipped, and a run cut off mid-training
resumes from its last checkpoint. The table gives per (protocol, preset) the mean and the 95%
t-interval over seeds beside UCTransNet's Table 1 (Wang et al., AAAI 2022: their base-64 models
under the 224x224 protocol). Get the data as `experiments/configs/monuseg.py` says.
"""

import argparse
import csv
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOCOLS = ('paper', 'native')
PRESETS = ('unet', 'resunet', 'attention_unet', 'unet_plusplus')
FIELDS = ('protocol', 'preset', 'seed', 'steps', 'base_width', 'best_step', 'dice', 'iou', 'minutes', 'cpu')
# UCTransNet (Wang et al., AAAI 2022), Table 1, MoNuSeg column: Dice %, IoU %, base-64 models at 224x224,
# as issue 39 recalls them: not confirmed here (no searchable copy of the paper's results section).
PAPER = {
  'unet': (76.45, 62.86),
  'unet_plusplus': (77.01, 63.04),
  'attention_unet': (76.67, 63.47),
  'UCTransNet': (79.87, 66.68),
}


def cpu_name() -> str:
  """The processor model (from /proc/cpuinfo) and whether it has AVX-512, as figures must name it."""
  try:
    info = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return platform.processor() or platform.machine()
  model = next((line.split(':', 1)[1].strip() for line in info.splitlines() if line.startswith('model name')), '')
  flags = next((line for line in info.splitlines() if line.startswith('flags')), '')
  return f'{model} ({"AVX-512" if " avx512f" in flags else "AVX2"})'


def read_rows(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  with path.open(newline='') as f:
    return list(csv.DictReader(f))


def _key(protocol: str, preset: str, seed: int, steps: int, width: int) -> tuple:
  return (protocol, preset, str(seed), str(steps), str(width))


def trained_step(workdir: pathlib.Path) -> int:
  """The step of a run's latest checkpoint (Orbax step folders under checkpoints/), 0 for none."""
  folder = workdir / 'checkpoints'
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  return max(steps, default=0)


def one_run(
  protocol: str, preset: str, seed: int, steps: int, width: int, root: pathlib.Path, extra: tuple[str, ...] = ()
) -> dict:
  """Trains (or resumes) one run and evaluates its best checkpoint on the test split."""
  workdir = root / f'{protocol}-{preset}-w{width}-n{steps}-s{seed}'
  start = time.time()
  subprocess.run(
    [
      sys.executable,
      str(ROOT / 'experiments/train.py'),
      f'--config={ROOT / "experiments/configs/monuseg.py"}:{protocol}',
      f'--model={preset}',
      f'--config.seed={seed}',
      f'--config.train.num_steps={steps}',
      f'--config.model.base_width={width}',
      f'--workdir={workdir}',
      *extra,
    ],
    check=True,
  )
  reached = trained_step(workdir)
  if reached < steps:  # SIGTERM makes train.py checkpoint and exit 0: a run cut short is not a row
    raise SystemExit(f'{workdir} stopped at step {reached} of {steps}; rerun the same command to resume it')
  subprocess.run(
    [sys.executable, str(ROOT / 'experiments/evaluate.py'), f'--workdir={workdir}', '--split=test'], check=True
  )
  record = json.loads((workdir / 'eval_test.json').read_text())
  return {
    'protocol': protocol,
    'preset': preset,
    'seed': seed,
    'steps': steps,
    'base_width': width,
    'best_step': record['checkpoint_step'],
    'dice': f'{record["metrics"]["dice"]["mean"]:.4f}',
    'iou': f'{record["metrics"]["iou"]["mean"]:.4f}',
    'minutes': f'{(time.time() - start) / 60:.1f}',
    'cpu': cpu_name(),
  }


def table(rows: list[dict]) -> str:
  """Markdown: mean [95% t-interval] of test Dice and IoU per protocol and preset, the paper beside."""
  from resunet_jax.ablation import stats

  lines = [
    '| protocol | preset | width | steps | seeds | test Dice | test IoU | UCTransNet Table 1 (base 64) |',
    '|---|---|---|---|---|---|---|---|',
  ]
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row['protocol'], row['preset'], row['base_width'], row['steps']), []).append(row)
  order = {name: i for i, name in enumerate(PROTOCOLS + PRESETS)}
  for (protocol, preset, width, steps), group in sorted(
    groups.items(), key=lambda item: (order[item[0][0]], order[item[0][1]], int(item[0][2]), int(item[0][3]))
  ):
    cells = []
    for metric in ('dice', 'iou'):
      cells.append(stats.t_interval(float(row[metric]) for row in group).format())
    paper = PAPER.get(preset)
    reference = f'{paper[0] / 100:.4f} / {paper[1] / 100:.4f}' if paper else '—'
    lines.append(
      f'| {protocol} | {preset} | {width} | {steps} | {len(group)} | {cells[0]} | {cells[1]} | {reference} |'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--protocols', default=','.join(PROTOCOLS))
  parser.add_argument('--presets', default=','.join(PRESETS))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--base-width', type=int, default=16)
  parser.add_argument('--root', default=str(ROOT / 'runs/monuseg'), help='Folder of the runs (checkpoints).')
  parser.add_argument(
    '--csv', default=str(ROOT / 'benchmarks/results/monuseg.csv'), help='One CSV per set of --config-arg values.'
  )
  parser.add_argument('--table-only', action='store_true', help='Print the table of the CSV and exit.')
  parser.add_argument(
    '--config-arg',
    action='append',
    default=[],
    help='An extra train.py flag for every run, e.g. --config-arg=--config.data.image_size=64 (repeatable).',
  )
  args = parser.parse_args()
  path = pathlib.Path(args.csv)
  if not args.table_only:
    if not (os.environ.get('MONUSEG_DIR') or any(a.startswith('--config.data.folder') for a in args.config_arg)):
      sys.exit('MONUSEG_DIR is not set: point it at a MoNuSeg copy ({Train,Val,Test}_Folder/{img,labelcol})')
    done = {_key(r['protocol'], r['preset'], r['seed'], r['steps'], r['base_width']) for r in read_rows(path)}
    for protocol in args.protocols.split(','):
      for seed in (int(s) for s in args.seeds.split(',')):
        for preset in args.presets.split(','):
          if _key(protocol, preset, seed, args.steps, args.base_width) in done:
            continue
          row = one_run(
            protocol, preset, seed, args.steps, args.base_width, pathlib.Path(args.root), tuple(args.config_arg)
          )
          new = not path.exists()
          path.parent.mkdir(parents=True, exist_ok=True)
          with path.open('a', newline='') as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
              writer.writeheader()
            writer.writerow(row)
          print(json.dumps(row), flush=True)
  print(table(read_rows(path)))


if __name__ == '__main__':
  main()
