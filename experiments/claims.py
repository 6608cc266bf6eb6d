"""The exploratory grid's verdicts on the design note's four claims about residual connections.

`experiments/ablate.py` passes `section` to `ablation.report.write`: each claim's endpoints in the
sweep (`ENDPOINTS`) are decided by `ablation.decision.decide`, the one rule of every report, with
Holm over all of them. A grid's verdicts are exploratory: its arms and margins were not fixed
before the runs (a pre-registered study, studies/*, has its own protocol and verdict section).
"""

from __future__ import annotations

from resunet_jax.ablation import decision, report, stats

CLAIMS = (
  'residual connections speed up convergence',
  'residual connections ease vanishing gradients',
  'residual connections sharpen edges and details',
  'residual connections allow deeper networks',
)

# The exploratory endpoint of each claim: (the run score compared, equivalence margin, what it measures).
# Claim 4's is the change of the residual-minus-plain Dice gain from the shallowest depth to the deepest.
ENDPOINTS = (
  ('auc', 0.02, 'the validation-Dice AUC (normalised by the budget), residual minus plain with all skips'),
  (
    'grad_share',
    0.3,
    "the bottleneck's gradient share (log10 of its per-parameter gradient RMS over the network's), residual "
    'minus plain with all skips; with long skips the decoder can bypass the bottleneck, so a small share can '
    'mean bypassed as well as vanished (Drozdzal et al. 2016)',
  ),
  ('boundary_f1', 0.01, 'boundary F1, residual minus plain with all skips, the Dice difference beside it'),
  (
    'dice',
    0.01,
    'the change of the Dice gain (residual minus plain, all skips) from the shallowest to the deepest depth',
  ),
)


def _claim_pairs(studies: dict[str, list[report.Arm]]) -> list[tuple[str, report.Arm, report.Arm]]:
  """(label, plain arm, residual arm) with all skips, at every depth and skip variant."""
  pairs = []
  for name, arms in studies.items():
    several = len({a.depth for a in arms}) > 1
    for depth, plain, residual in report.full_pairs(arms):
      label = f'{name}, depth {depth}' if several else name
      pairs.append((f'{label}, {plain.variant} skips' if plain.variant else label, plain, residual))
  return pairs


def _paired(a: report.Arm, b: report.Arm, key: str, target: float) -> dict[int, float]:
  """`{seed: a - b}` of a run score, over the seeds both have."""
  values_a, values_b = a.values(key, target), b.values(key, target)
  return {s: values_a[s] - values_b[s] for s in sorted(values_a.keys() & values_b.keys())}


def claim_decisions(
  studies: dict[str, list[report.Arm]], target: float
) -> list[tuple[int, str, decision.Decision, str]]:
  """Every claim's endpoints in the sweep, decided by `decision.decide` (Holm over all of them).

  Returns:
    (claim index 0-3, label, its decision, the numbers printed beside it), claims in order.
  """
  found: list[tuple[int, str, decision.Endpoint, str]] = []
  for label, plain, residual in _claim_pairs(studies):
    steps = stats.paired_difference(
      plain.values('steps_to_target', target, censor=True), residual.values('steps_to_target', target, censor=True)
    )
    reached = [f'{len(a.values("steps_to_target", target))}/{len(a.results)}' for a in (residual, plain)]
    shares = [stats.t_interval(a.values('grad_share', target).values()).format(2) for a in (residual, plain)]
    hd95 = stats.paired_difference(residual.values('hd95', target), plain.values('hd95', target))
    dice = stats.paired_difference(residual.values('dice', target), plain.values('dice', target))
    context = (
      f'validation Dice {target:g} reached {steps.format(0)} steps sooner (plain minus residual; by {reached[0]} '
      f'residual and {reached[1]} plain runs, the others counted at the budget)',
      f'shares {shares[0]} residual vs {shares[1]} plain',
      f'HD95 difference {hd95.format(2)} px; Dice difference {dice.format()}',
    )
    for claim, ((key, delta, _), text) in enumerate(zip(ENDPOINTS[:3], context, strict=True)):
      endpoint = decision.Endpoint.paired(label, list(_paired(residual, plain, key, target).values()), delta)
      found.append((claim, label, endpoint, text))
  for name, arms in studies.items():
    for variant in dict.fromkeys(a.variant for a in arms):
      gaps = [(d, _paired(r, p, 'dice', target)) for d, p, r in report.full_pairs(arms, variant)]
      if len(gaps) < 2:
        continue
      (shallow, first), (deep, last) = gaps[0], gaps[-1]
      # Seed s fixes the data order at every depth, so the per-seed change of the gain is paired.
      change = [last[s] - first[s] for s in sorted(last.keys() & first.keys())]
      label = f'{name}, {variant} skips' if variant else name
      table = '; '.join(f'depth {d}: {stats.t_interval(g.values()).format()}' for d, g in gaps)
      text = f'Dice gain by depth: {table}; the change from depth {shallow} to {deep} is the endpoint'
      found.append((3, label, decision.Endpoint.paired(label, change, ENDPOINTS[3][1]), text))
  decided = decision.decide([endpoint for _, _, endpoint, _ in found]) if found else []
  return [(c, label, d, text) for (c, label, _, text), d in zip(found, decided, strict=True)]


def claim_verdicts(studies: dict[str, list[report.Arm]], target: float) -> list[str]:
  """One line per claim and study that can test it: the verdict `decision.decide` gives, its effect
  [95% interval] and the numbers beside it."""
  decided = claim_decisions(studies, target)
  lines = []
  for index, claim in enumerate(CLAIMS):
    lines.append(f'{index + 1}. **{claim}**. Measured by {ENDPOINTS[index][2]} (margin {ENDPOINTS[index][1]:g}).')
    found = [(label, d, text) for c, label, d, text in decided if c == index]
    lines += [f'   - {label}: {d.label} — {d.effect.format()}; {text}' for label, d, text in found]
    if not found:
      lines.append(
        '   - not tested in this grid: run the depth sweep, --config=experiments/configs/ablate_depth.py'
        if index == 3
        else '   - not tested (no study has plain and residual arms with all skips)'
      )
  return lines


def section(studies: dict[str, list[report.Arm]], target: float) -> list[str]:
  """The report's verdict section: its heading and `claim_verdicts`."""
  return ["## Verdicts on the design note's claims (exploratory)", '', *claim_verdicts(studies, target), '']
