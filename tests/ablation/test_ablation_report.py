"""The report's tables and verdicts on made-up results whose answers are known."""

import csv

import pytest

from experiments import claims
from resunet_jax import ablation, models
from resunet_jax.ablation import report


def _result(residual, seed, *, dice, boundary_f1, curve, bottleneck_grad, depth=2):
  skips = '1' * depth
  blocks = models.block_names(models.ModelConfig(depth=depth))
  counts = {name: 100 for name in (*blocks, 'head')}
  gradient = {
    'step': 10,
    'grad_norm': 1.0,
    **{f'grad_norm/{b}': 0.1 for b in blocks},
    'grad_norm/bottleneck': bottleneck_grad,
  }
  return ablation.Result(
    run_id=f'{int(residual)}{skips}{depth}{seed}',
    data='synthetic_roads/size64',
    residual=residual,
    skips=skips,
    depth=depth,
    seed=seed,
    num_steps=200,
    test={'dice': dice, 'iou': dice / 2, 'accuracy': 0.9, 'boundary_f1': boundary_f1, 'hd95': 10 - 5 * dice},
    curve=curve,
    gradients=[gradient],
    param_counts=counts,
    knockouts={'skip': {'labels': ['00', '10', '01', '11'], 'scales': [], 'dice': [0.1, 0.5, 0.2, dice]}},
    wall_s=1.0,
  )


def _spec(study, arm, residual, seed, depth=2):
  return ablation.RunSpec(study, arm, seed, residual, '1' * depth, depth, None)


def _pairs(residual_better: bool, depths=(2,)):
  pairs = []
  for depth in depths:
    for seed in range(3):
      # The arms' seed-to-seed jitters differ, so every paired difference has a spread (0.01 per
      # seed): its interval's width is the t multiplier's (4.303 at 2 degrees of freedom).
      jitter, other = 0.01 * seed, 0.02 * seed
      good = dict(
        dice=0.8 + jitter,
        boundary_f1=0.85 + jitter,
        curve=[(50, 0.3), (100, 0.6), (150, 0.7)],
        bottleneck_grad=0.5 + jitter,
      )
      bad = dict(
        dice=0.6 + other, boundary_f1=0.7 + other, curve=[(50, 0.1), (100, 0.3), (150, 0.55)], bottleneck_grad=0.01
      )
      plain, residual = (bad, good) if residual_better else (good, bad)
      if depth == depths[-1] and len(depths) > 1:  # deeper: the gap widens
        plain = {**plain, 'dice': plain['dice'] - 0.1}
      suffix = f'-d{depth}' if len(depths) > 1 else ''
      pairs.append(
        (_spec('roads', f'plain-all{suffix}', False, seed, depth), _result(False, seed, depth=depth, **plain))
      )
      pairs.append(
        (_spec('roads', f'residual-all{suffix}', True, seed, depth), _result(True, seed, depth=depth, **residual))
      )
  return pairs


def _verdicts(pairs, study='roads'):
  """The verdict lines of `study`, claim by claim, and all lines."""
  lines = claims.claim_verdicts(report.group(pairs), target=0.5)
  return [line.removeprefix(f'   - {study}: ') for line in lines if line.startswith(f'   - {study}: ')], lines


def test_clear_residual_advantages_are_supported():
  (convergence, gradients, edges), lines = _verdicts(_pairs(True))
  assert convergence.startswith('supported') and 'by 3/3 residual' in convergence  # 150 vs 100 steps
  assert gradients.startswith('supported')
  # Mean 0.14, sd 0.01 over 3 seeds: 0.14 +- 4.303 * 0.01 / sqrt(3) (a normal 1.96 would give [0.129, 0.151]).
  assert edges.startswith('supported — 0.140 [0.115, 0.165]; HD95 difference')
  assert lines[-1] == '   - not tested in this grid: run the depth sweep, --config=experiments/configs/ablate_depth.py'
  assert [line[:3] for line in lines if not line.startswith(' ')] == ['1. ', '2. ', '3. ', '4. ']
  assert '(margin 0.02)' in lines[0]  # the rule's equivalence margin is stated


def test_residual_disadvantages_are_not_supported():
  verdicts, _ = _verdicts(_pairs(False))
  assert [v.split(' — ')[0] for v in verdicts] == ['not supported'] * 3


def test_noise_is_inconclusive():
  pairs = []
  for seed, (a, b) in enumerate([(0.7, 0.6), (0.6, 0.7), (0.65, 0.66)]):
    common = {'curve': [(50, 0.6)], 'bottleneck_grad': 0.1}
    pairs.append((_spec('cells', 'plain-all', False, seed), _result(False, seed, dice=a, boundary_f1=a, **common)))
    pairs.append((_spec('cells', 'residual-all', True, seed), _result(True, seed, dice=b, boundary_f1=b, **common)))
  (_, _, edges), _ = _verdicts(pairs, 'cells')
  assert edges.startswith('inconclusive — ')


def test_convergence_and_gradient_noise_is_inconclusive():
  pairs = []
  reach = [((100, 50), 0.2), ((50, 100), 0.05), ((150, 100), 0.1)]  # (plain, residual) steps; residual's grad
  for seed, ((plain_at, residual_at), grad) in enumerate(reach):
    common = {'dice': 0.7, 'boundary_f1': 0.7}
    plain = _result(False, seed, curve=[(plain_at, 0.6)], bottleneck_grad=0.1, **common)
    residual = _result(True, seed, curve=[(residual_at, 0.6)], bottleneck_grad=grad, **common)
    pairs += [(_spec('cells', 'plain-all', False, seed), plain), (_spec('cells', 'residual-all', True, seed), residual)]
  (convergence, gradients, _), _ = _verdicts(pairs, 'cells')
  assert convergence.startswith('inconclusive — ') and ' 17 [-127, 160] steps sooner' in convergence
  assert gradients.startswith('inconclusive — ')


def test_a_plain_arm_that_never_reaches_the_target_is_counted_at_the_budget():
  pairs = []
  for seed in range(3):
    common = {'dice': 0.7, 'boundary_f1': 0.7, 'bottleneck_grad': 0.1}
    plain = _result(False, seed, curve=[(100, 0.2), (200, 0.4)], **common)
    residual = _result(True, seed, curve=[(50 + 10 * seed, 0.6), (200, 0.6)], **common)
    pairs += [(_spec('roads', 'plain-all', False, seed), plain), (_spec('roads', 'residual-all', True, seed), residual)]
  (convergence, _, _), _ = _verdicts(pairs)
  assert convergence.startswith('supported') and ' 140 [115, 165] steps sooner' in convergence  # 200 - 60 on average
  assert 'by 3/3 residual and 0/3 plain runs, the others counted at the budget' in convergence
  table = '\n'.join(report._study_section('roads', report.group(pairs)['roads'], 0.5))
  assert '| `plain-all` |' in table and '— (0/3)' in table


def test_depth_claim_is_not_supported_when_the_deep_residual_network_loses():
  pairs = []
  for depth, gains in ((2, (0.05, 0.06, 0.04)), (4, (-0.05, -0.06, -0.04))):
    for seed, gain in enumerate(gains):
      common = {'boundary_f1': 0.7, 'curve': [(50, 0.6)], 'bottleneck_grad': 0.1, 'depth': depth}
      pairs.append(
        (_spec('roads', f'plain-all-d{depth}', False, seed, depth), _result(False, seed, dice=0.6, **common))
      )
      pairs.append(
        (_spec('roads', f'residual-all-d{depth}', True, seed, depth), _result(True, seed, dice=0.6 + gain, **common))
      )
  verdicts, _ = _verdicts(pairs)
  assert verdicts[-1].startswith('not supported') and 'depth 4: -0.050 [' in verdicts[-1]


def test_depth_claim_needs_a_widening_gap():
  verdicts, _ = _verdicts(_pairs(True, depths=(2, 4)))
  assert verdicts[-1].startswith('supported')
  assert 'depth 2: 0.190 [0.165, 0.215]' in verdicts[-1] and 'depth 4: 0.290 [0.265, 0.315]' in verdicts[-1]
  assert verdicts[-1].startswith('supported — 0.100 [0.100, 0.100]; ')  # the change of the gain, the endpoint


def test_depth_claim_with_a_noisy_widening_is_inconclusive():
  """A larger mean gain at depth 4 whose seed-to-seed change straddles zero does not support the claim."""
  pairs = []
  for depth, gains in (
    (2, (0.05, 0.05, 0.05)),
    (4, (0.30, 0.02, 0.04)),
  ):  # mean 0.05 -> 0.12, changes +0.25 -0.03 -0.01
    for seed, gain in enumerate(gains):
      common = {'boundary_f1': 0.7, 'curve': [(50, 0.6)], 'bottleneck_grad': 0.1, 'depth': depth}
      arm = f'-d{depth}'
      pairs.append((_spec('roads', f'plain-all{arm}', False, seed, depth), _result(False, seed, dice=0.6, **common)))
      pairs.append(
        (_spec('roads', f'residual-all{arm}', True, seed, depth), _result(True, seed, dice=0.6 + gain, **common))
      )
  verdicts, _ = _verdicts(pairs)
  assert verdicts[-1].startswith('inconclusive — 0.070 [') and 'depth 4: 0.120 [' in verdicts[-1]


def test_files_of_a_report(tmp_path):
  pairs = _pairs(True)
  paths = report.write(pairs, tmp_path, target=0.5, command='python experiments/ablate.py')
  rows = list(csv.DictReader(paths['results'].open()))
  assert len(rows) == 6 and {r['arm'] for r in rows} == {'plain-all', 'residual-all'}
  assert float(rows[1]['dice']) == pytest.approx(0.8) and rows[0]['steps_to_target'] == '150'
  knockouts = list(csv.DictReader(paths['knockouts'].open()))
  assert len(knockouts) == 6 * 4
  text = paths['report'].read_text()
  assert (
    'Command: `python experiments/ablate.py`' in text and '| `residual-all` | 11 | 3 | 0.810 [0.785, 0.835]' in text
  )
  for name in ('learning_curves', 'metrics_ci', 'gradient_norms', 'gradient_profile', 'knockout_heatmap'):
    assert paths[name].stat().st_size > 1000
