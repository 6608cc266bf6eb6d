r"""Evaluates a trained run on a split.

  python experiments/evaluate.py --workdir=W [--split=test] [--checkpoint=best|latest|STEP] [--member=M]

Writes W/eval_<split>.json (per metric mean, median, 5th/95th percentile, per-class Dice) and
W/eval_<split>.md (the same as a table), and prints the table. For member M of a population
(`--member=M`) they go to W/members/M/.
"""

import json

from absl import flags

from resunet_jax import cli, losses, runtime
from resunet_jax.training import evaluation, parallel, restore

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a training run.', required=True)
_SPLIT = flags.DEFINE_string('split', 'test', "Split: 'train', 'validation', 'test' or a raw split string.")
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', "'best' (validation Dice), 'latest' or a step.")
_MEMBER = flags.DEFINE_integer('member', 0, 'Population member (0 for an ordinary run).')
_PRUNE = flags.DEFINE_integer(
  'prune_level', None, 'A deeply supervised UNet++: predict with its sub-network of this depth (models.prune).'
)
_EVALUATION = flags.DEFINE_enum(
  'evaluation',
  None,
  evaluation.MODES,
  "'whole': every image at its own size (sliding window); 'resize': resized to data.image_size; default the run's.",
)
_BACKEND = flags.DEFINE_enum(
  'backend', 'auto', runtime.BACKENDS, 'Layer set (resunet_jax.runtime): auto, stock or cpu.'
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {argv[1:]}; flags look like --split=test')
  run = restore.load_run(_WORKDIR.value, _CHECKPOINT.value, _BACKEND.value, _MEMBER.value, _PRUNE.value)
  if _EVALUATION.value is not None:
    with run.config.unlocked():
      run.config.data.evaluation = _EVALUATION.value
  _, eval_fn = parallel.compile_steps('jit', run.mesh, losses.LossWeights())
  per_image = run.evaluate(_SPLIT.value, eval_fn)
  record = evaluation.report(per_image, tolerance=run.config.train.boundary_tolerance)
  mode = run.config.data.get('evaluation') or 'resize'
  record.update(split=_SPLIT.value, checkpoint_step=run.step, workdir=str(_WORKDIR.value), evaluation=mode)
  name = _SPLIT.value.replace('/', '_').replace('[', '_').replace(']', '').replace(':', '-').replace('%', 'pct')
  if _EVALUATION.value is not None:
    name += f'_{mode}'
  if _PRUNE.value is not None:
    name += f'_pruned{_PRUNE.value}'
    record.update(prune_level=_PRUNE.value)
  out = run.directory / f'eval_{name}'
  out.with_suffix('.json').write_text(json.dumps(record, indent=2))
  table = evaluation.markdown(
    record,
    f'{run.config.preset}{"" if _PRUNE.value is None else f" pruned to depth {_PRUNE.value}"} on '
    f'{run.config.data.name} [{_SPLIT.value}], step {run.step}',
  )
  out.with_suffix('.md').write_text(table)
  print(table)
  print(f'wrote {out}.json and {out}.md')


if __name__ == '__main__':
  cli.run(main)
