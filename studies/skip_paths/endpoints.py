"""The skip-path study's seven pre-registered endpoints (PROTOCOL.md beside this file) and their verdicts."""

from __future__ import annotations

from collections.abc import Sequence

from resunet_jax.ablation import decision, report

# (name, (residual, variant) of the arm, of the arm it is compared with); variant '' is concat
ENDPOINTS = (
  ('A1: plain attention - plain concat', (False, 'attention'), (False, '')),
  ('A2: residual attention - residual concat', (True, 'attention'), (True, '')),
  ('N1: plain nested - plain concat', (False, 'nested'), (False, '')),
  ('N2: residual nested - residual concat', (True, 'nested'), (True, '')),
  ('R1: residual concat - plain concat', (True, ''), (False, '')),
  ('R2: residual attention - plain attention', (True, 'attention'), (False, 'attention')),
  ('R3: residual nested - plain nested', (True, 'nested'), (False, 'nested')),
)
DELTA = 0.02  # Dice: the protocol's equivalence margin


def test_dice(arms: Sequence[report.Arm]) -> dict[tuple[bool, str], dict[int, float]]:
  """(residual, variant) -> {seed: test Dice} of each arm with every skip."""
  return {
    (a.residual, a.variant): {s: r.test['dice'] for s, r in a.results.items()} for a in arms if a.skips == '1' * a.depth
  }


def decisions(dice: dict[tuple[bool, str], dict[int, float]]) -> list[decision.Decision]:
  """The verdicts of the endpoints the arms have: per-seed paired differences of test Dice, Holm
  over them (`decision.decide`). Empty unless there are a concat and another skip kind, each with
  the same seeds (the stopping rule: verdicts only once every arm has all its seeds).

  Args:
    dice: `test_dice`'s table, or the same read from the committed results.csv.
  """
  variants = {variant for _, variant in dice}
  if '' not in variants or len(variants) < 2 or len({frozenset(by_seed) for by_seed in dice.values()}) != 1:
    return []
  endpoints = [
    decision.Endpoint.paired(name, [dice[arm][s] - dice[other][s] for s in sorted(dice[arm])], DELTA)
    for name, arm, other in ENDPOINTS
    if arm in dice and other in dice
  ]
  return decision.decide(endpoints) if endpoints else []


def render(name: str, decided: Sequence[decision.Decision]) -> list[str]:
  """The report's verdict section of study `name`: its header, the test's terms and `report.decision_table`."""
  return [
    f'## Skip paths in study `{name}` (pre-registered: studies/skip_paths/PROTOCOL.md)',
    '',
    'Test Dice differences paired by seed [95% t-interval]; one-sided p-values Holm-adjusted over '
    f'the {len(decided)} endpoints; equivalence margin {DELTA:g}.',
    '',
    *report.decision_table(decided),
    '',
  ]


def section(studies: dict[str, list[report.Arm]]) -> list[str]:
  """`render` of every study that has the endpoints (`decisions`)."""
  lines = []
  for name, arms in studies.items():
    decided = decisions(test_dice(arms))
    if decided:
      lines += render(name, decided)
  return lines
