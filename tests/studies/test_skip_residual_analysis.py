"""The skip/residual study's analysis on synthetic results.csv rows: each claim's endpoint from its
stage's rows, every verdict of the rule, claim 2's validity check, the CSV round trip; and the
committed report against its table, its README and scipy."""

import csv
import json
import pathlib
import re

import numpy as np
import pytest

from resunet_jax.ablation import decision
from studies.skip_residual import analysis, protocol

DATASETS = ('synthetic_roads/size32', 'synthetic_cells/size32')
SEEDS = range(10)


def _row(stage, data, block, skips, seed, *, recipe='he-group', depth=4, **values):
  return {
    'stage': stage,
    'data': data,
    'arm': f'{block}-{skips}' + ('' if depth == 4 else f'-d{depth}'),
    'block': block,
    'recipe': recipe,
    'skips': skips,
    'depth': depth,
    'seed': seed,
    'run_id': f'{stage}{data}{block}{skips}{seed}{recipe}{depth}{values.get("learning_rate", "")}',
    'learning_rate': 1e-3,
    'width': 8,
    'steps': 1000,
    'params': 1000 + 50 * (block != 'plain'),
    **values,
  }


def _rows(effects, noise=0.01, fail=None, seed=0):
  """A whole study's rows with these true effects per claim (`effects[claim]`), Gaussian noise of
  sd `noise` (claim 2: 10x) per run; `fail`: the tuning arm that failed and its initial measure."""
  rng = np.random.default_rng(seed)
  rows = []
  for data in DATASETS:
    for block in ('plain', 'identity'):
      residual = block == 'identity'
      for s in SEEDS:
        dice = 0.7 + rng.normal(0, 0.05)
        rows.append(
          _row(
            'primary', data, block, 'all', s,
            val_auc=0.6 + effects[1] * residual + rng.normal(0, noise),
            test_dice=dice,
            dice=dice,
            boundary_f1_1px=0.1 + 0.8 * dice + effects[3] * residual + rng.normal(0, noise),
          )
        )  # fmt: skip
        for depth in (2, 3, 4, 5):
          gain = effects[4] * (depth - 4) * residual + rng.normal(0, noise)
          rows.append(
            _row('primary' if depth == 4 else 'depth', data, block, 'none', s, depth=depth, test_dice=0.5 + gain)
          )
        rows.append(
          _row(
            'initial', data, block, 'none', s, recipe='lecun-none',
            log10_grad_ratio=-1 + effects[2] * residual + rng.normal(0, 10 * noise), logit_std=0.1, dead_relu=0.2,
          )
        )  # fmt: skip
    for block in ('plain', 'projection', 'identity'):
      for recipe in protocol.RECIPES:
        failed = fail is not None and (block, recipe) == fail[0]
        for lr in (3e-4, 1e-3):
          dice = 0.075 if failed else 0.5 + lr  # a failed run: no better than the constant prediction
          rows.append(
            _row('tune', data, block, 'none', 1000, recipe=recipe, val_dice=dice, failed=int(failed), learning_rate=lr)
          )
        measure = fail[1] if failed else -1.0 + 0.1 * protocol.TUNED_BLOCKS.index(block)
        rows.append(_row('initial', data, block, 'none', 1000, recipe=recipe, log10_grad_ratio=measure))
  return rows


def _verdicts(rows):
  return {(v.claim, analysis.short(v.data)): v for v in analysis.decisions(rows)}


@pytest.mark.parametrize(
  ('effects', 'noise', 'expected'),
  [
    ({1: 0.1, 2: 2.0, 3: 0.1, 4: 0.1}, 0.01, decision.SUPPORTED),
    ({1: -0.1, 2: -2.0, 3: -0.1, 4: -0.1}, 0.01, decision.NOT_SUPPORTED),
    ({1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}, 0.001, decision.EQUIVALENT),
    ({1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}, 0.2, decision.INCONCLUSIVE),
  ],
)
def test_every_claim_gets_the_verdict_of_its_planted_effect(effects, noise, expected):
  verdicts = _verdicts(_rows(effects, noise))
  assert len(verdicts) == 8
  assert {v.decided.verdict for v in verdicts.values()} == {expected}
  for (claim, _), verdict in verdicts.items():
    assert verdict.decided.endpoint.delta == analysis.DELTAS[claim]
    if expected in (decision.SUPPORTED, decision.NOT_SUPPORTED):  # the estimate is near the planted effect
      assert verdict.decided.effect.mean == pytest.approx(effects[claim], abs=0.05 * abs(effects[claim]) + 0.01)


def test_each_endpoint_reads_its_own_stage_arms_and_seeds():
  rows = _rows({1: 0.1, 2: 2.0, 3: 0.05, 4: 0.02}, noise=0.0)
  data = DATASETS[0]
  assert analysis.claim1(rows, data).estimate == pytest.approx(0.1) and analysis.claim1(rows, data).df == 9
  assert analysis.claim2(rows, data).estimate == pytest.approx(2.0)  # the tuning seed 1000 is left out
  assert analysis.claim2(rows, data).df == 9
  coefficient, se, df = analysis.edge_regression(rows, data)
  assert coefficient == pytest.approx(0.05) and se == pytest.approx(0, abs=1e-9) and df == 17  # 20 runs, 3 terms
  assert analysis.slopes(analysis.depth_gains(rows, data)) == pytest.approx([0.02] * 10)
  partial = [r for r in rows if not (r['stage'] == 'depth' and r['seed'] == 3 and r['depth'] == 5)]
  assert len(analysis.slopes(analysis.depth_gains(partial, data))) == 9  # a seed without every depth is left out
  no_depth = [r for r in rows if r['stage'] != 'depth']
  assert analysis.claim4(no_depth, data).df == 0  # one depth: no slope, no test
  assert _verdicts(no_depth)[(4, 'roads')].label == decision.INCONCLUSIVE


def test_claim_2_is_inconclusive_when_its_measure_does_not_flag_the_failed_arm():
  effects = {1: 0.1, 2: 2.0, 3: 0.1, 4: 0.1}
  flagged = _verdicts(_rows(effects, fail=(('plain', 'lecun-none'), -3.0)))[(2, 'roads')]
  assert flagged.label == decision.SUPPORTED and not flagged.reason
  missed = _verdicts(_rows(effects, fail=(('plain', 'lecun-none'), -0.95)))  # above plain's trained -1.0
  assert missed[(2, 'roads')].label == decision.INCONCLUSIVE
  assert missed[(2, 'roads')].decided.p_claim < decision.ALPHA  # the test alone would say supported
  assert missed[(2, 'roads')].reason == 'the measure does not flag the failed arm'
  assert missed[(1, 'roads')].label == decision.SUPPORTED  # the other claims keep theirs
  check = analysis.validity(_rows(effects, fail=(('plain', 'lecun-none'), -0.95)), DATASETS[0])
  assert check.failed == {'plain lecun-none': -0.95} and len(check.trained) == 11 and not check.valid
  assert analysis.validity(_rows(effects), DATASETS[0]).valid  # nothing failed: nothing to flag


def test_the_verdicts_are_recomputed_from_the_written_csv(tmp_path):
  rows = _rows({1: 0.1, 2: 0.0, 3: -0.1, 4: 0.0}, noise=0.003)
  names = list(dict.fromkeys(key for row in rows for key in row))
  with (tmp_path / 'results.csv').open('w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=[*names, 'val_curve'])
    writer.writeheader()
    writer.writerows({**row, 'val_curve': json.dumps([])} for row in rows)
  back = protocol.read_rows(tmp_path / 'results.csv')
  assert [v.label for v in analysis.decisions(back)] == [v.label for v in analysis.decisions(rows)]
  labels = {key: v.label for key, v in _verdicts(back).items()}
  assert labels[(1, 'roads')] == decision.SUPPORTED and labels[(3, 'cells')] == decision.NOT_SUPPORTED
  assert labels[(2, 'roads')] == 'equivalent within +-0.3'


def test_the_hierarchical_bootstrap_resamples_seeds_then_images():
  assert analysis.hierarchical_bootstrap(np.full((10, 50), 0.25)) == pytest.approx((0.25, 0.25))
  rng = np.random.default_rng(1)
  seed_means = rng.normal(0.05, 0.02, 10)
  flat = np.repeat(seed_means[:, None], 50, axis=1)  # no spread within a seed: only seeds vary
  low, high = analysis.hierarchical_bootstrap(flat)
  assert low < seed_means.mean() < high
  assert high - low == pytest.approx(2 * 1.96 * seed_means.std() / np.sqrt(10), rel=0.3)
  noisy = flat + rng.normal(0, 0.5, flat.shape)  # image noise widens it
  wide_low, wide_high = analysis.hierarchical_bootstrap(noisy)
  assert wide_high - wide_low > 1.5 * (high - low)
  assert np.isnan(analysis.hierarchical_bootstrap(flat[:1])[0])  # one seed: no interval


def test_per_image_differences_pair_seeds_and_images():
  rows = [
    _row('primary', 'd', 'identity', 'all', 0, dice_per_image=[1.0, 0.5]),
    _row('primary', 'd', 'plain', 'all', 0, dice_per_image=[0.5, 0.5]),
    _row('primary', 'd', 'identity', 'all', 1, dice_per_image=[0.0, 1.0]),  # no plain seed 1: left out
    _row('tune', 'd', 'plain', 'all', 1000, val_dice=0.5),
  ]
  np.testing.assert_array_equal(
    analysis.per_image_differences(rows, stage='primary', data='d', skips='all'), [[0.5, 0.0]]
  )


def test_knockout_effects_choose_on_validation_and_score_on_test():
  skip = {
    'labels': ['00', '10', '01', '11'],
    'dice': [0.2, 0.5, 0.6, 0.8],
    'val_dice': [0.2, 0.7, 0.6, 0.8],  # validation prefers '10'; test would prefer '01'
  }
  residual = {'labels': ['none', '-enc_0', 'all'], 'dice': [0.8, 0.7, 0.1], 'val_dice': [0.8, 0.75, 0.1]}
  rows = [_row('primary', 'd', 'identity', 'all', s, knockouts={'skip': skip, 'residual': residual}) for s in (0, 1)]
  effects = analysis.knockout_effects(rows, 'd', 'identity-all')
  assert effects['skip 10'].mean == pytest.approx(-0.3) and effects['skip 01'].mean == pytest.approx(-0.2)
  assert 'skip 00' not in effects and effects['chosen skip'].mean == pytest.approx(-0.3)
  assert effects['residual -enc_0'].mean == pytest.approx(-0.1) and effects['residual all'].mean == pytest.approx(-0.7)
  assert effects['chosen residual'].mean == pytest.approx(-0.1) and effects['chosen residual'].n == 2


def test_secondary_effects_pair_each_comparison_by_seed_across_stages():
  d = 'd'
  rows = [_row('tune', d, 'plain', 'all', 1000, val_dice=0.5)]
  for s in range(5):
    rows += [
      _row('primary', d, 'plain', 'all', s, test_dice=0.6 + 0.01 * s, band_error=0.2, interior_error=0.05,
           recall_width_1_2px=0.4, params=100, width=8, failed=0),
      _row('primary', d, 'identity', 'all', s, test_dice=0.65 + 0.01 * s, band_error=0.15, interior_error=0.05,
           recall_width_1_2px=0.5, params=110, width=8, failed=0),
      _row('secondary', d, 'projection', 'all', s, test_dice=0.62 + 0.01 * s, failed=0),
      _row('secondary', d, 'plain', 'all', s, recipe='lecun-none', test_dice=0.5, failed=0),
      _row('secondary', d, 'identity', 'all', s, recipe='lecun-none', test_dice=0.58, failed=0),
      _row('primary', d, 'plain', 'none', s, test_dice=0.1, failed=1, **{'update/enc_0': 0.01}),
      _row('primary', d, 'identity', 'none', s, test_dice=0.3, failed=0, **{'update/enc_0': 0.1}),
    ]  # fmt: skip
  rows.append(_row('secondary', d, 'projection', 'all', 1000, test_dice=0.0, failed=0))  # a tuning seed: left out
  effects = analysis.secondary_effects(rows, d)
  assert effects['test Dice, projection - plain, all skips'].mean == pytest.approx(0.02)
  assert effects['test Dice, projection - plain, all skips'].n == 5
  assert effects['test Dice, projection - identity, all skips'].mean == pytest.approx(-0.03)
  assert effects['test Dice, identity - plain under lecun-none, all skips'].mean == pytest.approx(0.08)
  assert effects['band_error, identity - plain, all skips'].mean == pytest.approx(-0.05)
  assert effects['interior_error, identity - plain, all skips'].mean == pytest.approx(0.0)
  assert effects['recall_width_1_2px, identity - plain, all skips'].mean == pytest.approx(0.1)
  assert effects['log10 update/enc_0 (relative update size), identity / plain, no skips'].mean == pytest.approx(1.0)
  assert 'test Dice, projection - plain, none skips' not in effects  # no projection runs without skips


def test_the_arm_table_counts_failures_and_leaves_out_repeated_runs():
  rows = [
    _row('primary', 'd', 'plain', 'none', s, test_dice=dice, failed=int(dice < 0.2), params=100, learning_rate=1e-3)
    for s, dice in enumerate((0.1, 0.5, 0.6))
  ]
  repeat = dict(rows[0], stage='secondary', arm='plain-wide')  # the same run asked for by another stage
  table = analysis.arm_table([*rows, repeat], 'd')
  assert len(table) == 3  # header, rule, one arm: the repeat is not a row of its own
  cells = [cell.strip() for cell in table[2].split('|')]
  assert cells[5] == '3 (1)' and cells[7].startswith('0.400') and cells[8].startswith('0.550')


def test_the_final_report_adds_secondary_analyses_and_figures_only_when_final(tmp_path):
  from studies.skip_residual import figures  # matplotlib: only this test needs it

  rows = _rows({1: 0.1, 2: 2.0, 3: 0.05, 4: 0.02})
  drawn = figures.study_figures(rows, tmp_path)
  assert drawn == ['robustness.png', 'primary_runs.png', 'depth_gain.png']
  assert all((tmp_path / name).stat().st_size > 1000 for name in drawn)
  final = analysis.markdown(rows, progress={}, plan={}, final=True, figures=drawn)
  assert '## Secondary analyses' in final and '![depth_gain.png](depth_gain.png)' in final
  assert "Claim 2's validity check on roads passes" in final and 'Depth without skips on roads' in final
  interim = analysis.markdown(rows, progress={}, plan={}, final=False)
  assert 'Secondary analyses' not in interim and '**supported**' not in interim


def test_the_boundary_class_is_reported_per_class_and_paired_by_seed_without_a_verdict():
  rows = _rows({1: 0.1, 2: 2.0, 3: 0.05, 4: 0.02})
  three = 'synthetic_cells/three_class_size32'
  for s in range(5):
    rows += [
      _row('boundary', three, 'plain', 'all', s, class_dice_0=0.9, class_dice_1=0.6, class_dice_2=0.3 + 0.01 * s),
      _row('boundary', three, 'identity', 'all', s, class_dice_0=0.9, class_dice_1=0.6, class_dice_2=0.35 + 0.01 * s),
    ]
  assert analysis.datasets(rows) == list(DATASETS) and len(analysis.decisions(rows)) == 8  # no endpoint of its own
  lines = analysis.boundary_lines(rows)
  (row,) = [line for line in lines if line.startswith('| 2 |')]
  assert row.split('|')[4].strip().startswith('0.050 [0.050, 0.050]')
  assert '\n'.join(lines) in analysis.markdown(rows, progress={}, plan={}, final=True)


def test_the_gradient_table_gives_each_blocks_log_gradient_at_initialisation_and_update_size():
  rows = [_row('tune', 'd', 'plain', 'none', 1000, val_dice=0.1)]
  for s in range(3):
    rows += [
      _row('initial', 'd', 'plain', 'none', s, recipe='lecun-none', **{'grad_rms/enc_0': 1e-3, 'grad_rms/dec_0': 1e-1}),
      _row(
        'initial', 'd', 'identity', 'none', s, recipe='lecun-none', **{'grad_rms/enc_0': 1e-2, 'grad_rms/dec_0': 1e-1}
      ),
      _row('primary', 'd', 'plain', 'none', s, **{'update/enc_0': 1e-4, 'update/dec_0': 1e-2}),
    ]
  rows.append(
    _row('initial', 'd', 'plain', 'none', 1000, recipe='lecun-none', **{'grad_rms/enc_0': 1.0})
  )  # tuning seed
  table = analysis.gradient_table(rows, 'd')
  header = [cell.strip() for cell in table[0].split('|')[1:-1]]
  assert header == ['block', 'plain lecun-none grad', 'identity lecun-none grad', 'plain he-group update']
  body = {line.split('|')[1].strip(): [cell.strip() for cell in line.split('|')[2:-1]] for line in table[2:]}
  assert body['`enc_0`'] == ['-3.00', '-2.00', '-4.00'] and body['`dec_0`'] == ['-1.00', '-1.00', '-2.00']


def test_the_report_says_when_the_budget_cap_is_not_a_plateau():
  rows = [
    _row('pilot', 'd', 'plain', 'none', seed, steps=steps, val_dice=dice, test_dice=dice)
    for seed in (1000, 1001)
    for steps, dice in ((300, 0.1), (1000, 0.3), (3000, 0.5))
  ]
  assert analysis.pilot_plateau(rows) == 3000
  text = analysis.markdown(rows, progress={}, plan={'cuts': [], 'budget': 1000}, final=False)
  assert 'the plateau rule alone gives 3000 steps; cut 4 caps it, so B is not a plateau' in text
  flat = [dict(row, val_dice=0.5) for row in rows]
  assert analysis.pilot_plateau(flat) == 300
  assert 'rule alone' not in analysis.markdown(flat, progress={}, plan={'cuts': [], 'budget': 300}, final=False)


def test_the_committed_study_report_is_what_its_committed_table_gives():
  """A reader recomputes every verdict and secondary line of studies/skip_residual/results/report.md from
  the results.csv beside it (issue 19's acceptance): a report written by older analysis code, or
  edited by hand, fails here. Rerunning the study's command (nothing left to train) rewrites it."""
  study = pathlib.Path(__file__).parents[2] / 'studies' / 'skip_residual' / 'results'
  rows = protocol.read_rows(study / 'results.csv')
  report = (study / 'report.md').read_text()
  if '## Secondary analyses' not in report:
    pytest.skip('the committed study has no verdicts yet')
  at_b, _, rest = report.partition('## Verdicts at the plateau budget')
  at_plateau, _, secondary = rest.partition('## Secondary analyses') if rest else ('', '', at_b)
  sections = [
    (analysis.verdict_lines(rows), at_b),
    (analysis.secondary_lines(rows) + analysis.knockout_lines(rows), secondary),
  ]
  if rest:
    sections.append((analysis.verdict_lines(analysis.at_plateau(rows)), at_plateau))
  for lines, text in sections:
    assert [line for line in lines if line not in text] == []


STUDY = pathlib.Path(__file__).parents[2] / 'studies' / 'skip_residual'
VERDICT_STAGES = {'at B': 'primary', 'at the plateau': 'plateau_primary'}


def _report_sections():
  """The committed report's verdict tables: 'at B' and 'at the plateau' -> its text."""
  report = (STUDY / 'results' / 'report.md').read_text()
  at_b, _, rest = report.partition('## Verdicts at the plateau budget')
  return {'at B': at_b.partition('## Verdicts\n')[2], 'at the plateau': rest.partition('## Secondary analyses')[0]}


def test_the_committed_report_has_no_verdict_or_headline_line_the_table_does_not_give():
  """The other way round from the test above: no stale or extra line in a verdict section."""
  rows = protocol.read_rows(STUDY / 'results' / 'results.csv')
  given = {'at B': analysis.verdict_lines(rows), 'at the plateau': analysis.verdict_lines(analysis.at_plateau(rows))}
  for name, text in _report_sections().items():
    written = [line for line in text.splitlines() if line.startswith(('| ', '- '))]
    assert written and [line for line in written if line not in given[name]] == [], name


def _csv_rows():
  """results.csv read with the csv module alone (no project code)."""
  with (STUDY / 'results' / 'results.csv').open() as f:
    return list(csv.DictReader(f))


def _fmt_interval(mean, low, high):
  return f'{mean:.3f} [{low:.3f}, {high:.3f}]'


def test_claims_1_and_3_recomputed_with_scipy_from_the_committed_table():
  """An oracle independent of `analysis` and `decision`: claim 1 as scipy's paired t-test of the
  validation-Dice AUC (identity minus plain, all skips, by seed) and claim 3 as an OLS fit with
  scipy's t quantile, straight from results.csv; the report prints the same effect and interval."""
  from scipy import linalg
  from scipy import stats as scipy_stats

  rows = _csv_rows()
  tuning = {row['seed'] for row in rows if row['stage'] == 'tune'}
  sections = _report_sections()
  for name, stage in VERDICT_STAGES.items():
    for data, short in (('synthetic_roads/size32', 'roads'), ('synthetic_cells/size32', 'cells')):
      picked = [
        r for r in rows if (r['stage'], r['data'], r['skips']) == (stage, data, 'all') and r['seed'] not in tuning
      ]
      auc = {
        block: {r['seed']: float(r['val_auc']) for r in picked if r['block'] == block}
        for block in ('identity', 'plain')
      }
      seeds = sorted(auc['identity'].keys() & auc['plain'].keys())
      a, b = np.array([auc['identity'][s] for s in seeds]), np.array([auc['plain'][s] for s in seeds])
      assert len(seeds) == 10 and scipy_stats.ttest_rel(a, b).df == 9
      low, high = scipy_stats.t.interval(0.95, len(seeds) - 1, loc=(a - b).mean(), scale=scipy_stats.sem(a - b))
      row_1 = f'| 1: {analysis.CLAIMS[1]} | {short} | {_fmt_interval((a - b).mean(), low, high)} |'
      assert row_1 in sections[name], (name, row_1)
      fit = [r for r in picked if r['block'] in ('identity', 'plain')]
      x = np.array([[1.0, float(r['dice']), float(r['block'] == 'identity')] for r in fit])
      y = np.array([float(r['boundary_f1_1px']) for r in fit])
      coef, residuals, *_ = linalg.lstsq(x, y)
      df = len(y) - 3
      se = np.sqrt(float(residuals) / df * linalg.inv(x.T @ x)[2, 2])
      half = scipy_stats.t.ppf(0.975, df) * se
      row_3 = f'| 3: {analysis.CLAIMS[3]} | {short} | {_fmt_interval(coef[2], coef[2] - half, coef[2] + half)} |'
      assert row_3 in sections[name], (name, row_3)


def test_every_verdict_and_headline_number_the_readme_quotes_is_in_the_report():
  """The study's README quotes its report: each verdict cell (word and interval) is in the report's
  row for that claim and dataset, and each bold number is in the report."""
  readme = (STUDY / 'README.md').read_text()
  report = (STUDY / 'results' / 'report.md').read_text()
  sections = _report_sections()
  tables = re.findall(r'Verdicts (at the plateau|at B)[^\n]*\n\n\|[^\n]*\n\|[^\n]*\n((?:\|[^\n]*\n)+)', readme)
  assert [name for name, _ in tables] == ['at the plateau', 'at B']
  interval = r'-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]'
  checked = 0
  for name, body in tables:
    for line in body.strip().splitlines():
      claim = int(line[2])
      for short, cell in zip(('roads', 'cells'), line.strip('|').split('|')[1:], strict=True):
        verdict = cell.strip().split(':')[0]
        (row,) = [r for r in sections[name].splitlines() if r.startswith(f'| {claim}: ') and f'| {short} |' in r]
        assert f'**{verdict}**' in row, (name, claim, short)
        for number in re.findall(interval, cell):
          assert f'| {number} |' in row, (name, claim, short, number)
          checked += 1
  assert checked >= 14
  bold = [' '.join(n.split()) for n in re.findall(r'\*\*\+?(-?\d[^*]*)\*\*', readme)]
  assert len(bold) >= 15 and [number for number in bold if number not in report] == []
