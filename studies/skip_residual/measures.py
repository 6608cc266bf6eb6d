"""The study's per-run measures beyond the mean test metrics (PROTOCOL.md beside this file).

- `initial`: the network at initialisation on its run's first training batch: per-block
  gradient RMS (claim 2), the spread of the logits and the fraction of dead ReLU channels.
- `edges`: per-image test scores at boundary tolerances 0, 1 and 2 px, HD95 as a median over
  non-empty predictions with the empty-prediction rate, and the error in a band around true
  edges against the interior (claim 3).
- `updates`: each block's relative change from initialisation to the final weights, the
  optimiser's relative update size per block.

- `knockouts`: `ablation.runner.measure_knockouts` scored on validation as well (where the
  analysis chooses masks before reading their test scores), plus `skip_mean` (the skip masks
  with the knocked-out skips replaced by their mean over the training split, `skip_means`) and
  `branch` (each block's residual branch deleted, its shortcut kept: Veit et al. 2016).
- `class_dice`: each class's mean test Dice, for the three-class cells data (claim 3's
  boundary class, PROTOCOL.md amendment 6).

All but `class_dice` are binary-foreground measures (class 1 against the rest), as the study's
primary datasets are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

from resunet_jax import data, losses, metrics, models
from resunet_jax.ablation import runner
from resunet_jax.training import evaluation, loop, parallel, restore, steps
from resunet_jax.training import state as state_lib

TOLERANCES = (0, 1, 2)  # px, boundary F1
BAND_PX = 2  # half-width of the band around true edges


_compiled: dict[tuple, tuple] = {}


def _functions(run_config, model_config: models.ModelConfig, info) -> tuple:
  """The jitted initialiser `init(seed) -> TrainState` and `grads(state, batch) -> (gradients,
  logits, intermediates)` of one architecture and training section, shared by its seeds (a
  study measures many seeds of few architectures)."""
  shape = (1, *info.image_shape)
  key = (model_config, run_config.train.to_json_best_effort(sort_keys=True), shape)
  if key not in _compiled:
    model = models.UNet(model_config)
    train = run_config.train
    optimizer = state_lib.make_optimizer(train)
    weights = losses.LossWeights.from_config(train)
    ema_decay = train.ema_decay

    def init(seed):
      return state_lib.create_train_state(model, optimizer, shape, seed=seed, ema_decay=ema_decay)

    def grads(state, batch):
      def loss_fn(params):
        heads, updates = state.apply_fn(
          state.variables(params),
          batch['image'],
          train=True,
          all_heads=True,
          mutable=['batch_stats', 'intermediates'],
          capture_intermediates=True,
        )
        return losses.segmentation_loss(heads, batch['mask'], batch['valid'], weights), (heads[0], updates)

      gradients, (logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
      return gradients, logits, updates['intermediates']

    _compiled[key] = (jax.jit(init), jax.jit(grads))
  return _compiled[key]


def _init_state(run_config, model_config: models.ModelConfig, info) -> state_lib.TrainState:
  """The run's initial train state: `population.init_fn`'s for a population of one member."""
  init, _ = _functions(run_config, model_config, info)
  return init(jnp.int32(run_config.seed))


def _first_batch(run_config) -> dict:
  pipeline = data.make_pipeline(
    run_config.data, 'train', batch_size=run_config.train.batch_size, seed=run_config.seed, train=True
  )
  return {k: jnp.asarray(v) for k, v in next(iter(pipeline)).items() if k in ('image', 'mask', 'valid')}


def _dead_fraction(intermediates: dict, norm: str) -> float:
  """Channels of each block's last ReLU that are 0 at every pixel of every image of the batch.

  The last ReLU of a 'postact' block follows `conv2` (no norm: `conv2` is conv -> ReLU) or
  `norm2`; a channel is dead where that output (before the ReLU, for a norm) is <= 0 throughout.
  """
  name = 'conv2' if norm == 'none' else 'norm2'
  dead, total = 0, 0
  for captured in intermediates.values():
    if not isinstance(captured, dict) or name not in captured:
      continue
    out = np.asarray(captured[name]['__call__'][0])
    channel_dead = (out <= 0).reshape(-1, out.shape[-1]).all(0)
    dead += int(channel_dead.sum())
    total += channel_dead.size
  return dead / max(total, 1)


def initial(run_config) -> dict[str, float]:
  """The run's network at initialisation, on the first batch its training sees.

  Returns:
    `grad_rms/<block>` (gradient norm over sqrt(parameters) of each top-level module),
    `logit_std` (standard deviation of all logits of the batch), `dead_relu` (see
    `_dead_fraction`), and `log10_grad_ratio` = log10(grad_rms of enc_0 / grad_rms of dec_0),
    claim 2's endpoint: the gradient reaching the block furthest from the loss along the
    encoder relative to the last decoder block.
  """
  model_config, info, _ = loop.resolve(run_config)
  if model_config.block != 'postact':
    raise ValueError("the initial measures read a 'postact' block's last ReLU")
  state = _init_state(run_config, model_config, info)
  _, compute = _functions(run_config, model_config, info)
  grads, logits, intermediates = compute(state, _first_batch(run_config))
  out = {f'grad_rms/{name}': float(optax.tree.norm(g)) / np.sqrt(models.count_params(g)) for name, g in grads.items()}
  out['logit_std'] = float(jnp.std(logits))
  out['dead_relu'] = _dead_fraction(intermediates, model_config.norm)
  out['log10_grad_ratio'] = float(np.log10(out['grad_rms/enc_0'] / out['grad_rms/dec_0']))
  return out


def updates(loaded: restore.LoadedRun, run_config) -> dict[str, float]:
  """`update/<block>`: |final - initial| / |initial| of each top-level module's parameters."""
  model_config, info, _ = loop.resolve(run_config)
  start = _init_state(run_config, model_config, info).params
  final = jax.device_get(loaded.state.params)
  out = {}
  for name, initial_params in start.items():
    delta = jax.tree.map(
      lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), final[name], initial_params
    )
    out[f'update/{name}'] = float(optax.tree.norm(delta)) / max(float(optax.tree.norm(initial_params)), 1e-30)
  return out


def _band(truth: np.ndarray) -> np.ndarray:
  """Pixels within `BAND_PX` (Euclidean) of a boundary pixel of `truth` (none for an empty mask)."""
  edge = metrics._boundary(truth)  # noqa: SLF001 (the same edge definition as boundary F1)
  if not edge.any():
    return np.zeros_like(truth)
  return ndimage.distance_transform_edt(~edge) <= BAND_PX


def image_scores(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """One image's foreground scores: `dice`, `boundary_f1_<t>px`, `hd95`, `empty`, band errors."""
  p, t = prediction.astype(bool), truth.astype(bool)
  both = p.sum() + t.sum()
  scores = {'dice': 1.0 if both == 0 else 2.0 * float((p & t).sum()) / float(both)}
  for tolerance in TOLERANCES:
    scores[f'boundary_f1_{tolerance}px'] = metrics.boundary_f1(p, t, float(tolerance))
  scores['empty'] = float(not p.any())
  scores['hd95'] = metrics.hd95(p, t) if p.any() and t.any() else float('nan')
  band = _band(t)
  wrong = p != t
  scores['band_error'] = float(wrong[band].mean()) if band.any() else float('nan')
  scores['interior_error'] = float(wrong[~band].mean()) if (~band).any() else float('nan')
  return scores


PER_IMAGE = ('dice', 'boundary_f1_1px')  # kept per image (`edges(per_image=True)`): the bootstrap's resampling unit


WIDTH_BINS = ((1, '1_2px'), (2, '3_4px'), (3, '5px'))  # ridge distance d (a line's centre) -> width bin


def width_counts(prediction: np.ndarray, truth: np.ndarray) -> dict[str, int]:
  """True foreground pixels of each width bin and those of them predicted: `true_<bin>`, `hit_<bin>`.

  A pixel's width is estimated from the mask alone: d, the largest Euclidean distance to the
  background within 2 px of it (the ridge of the stroke it lies on), gives 1-2 px strokes d 1,
  3-4 px strokes d 2 and 5 px or wider d >= 3 (a 2 px stroke has no pixel farther than 1 from
  the background, so 1 and 2 px cannot be told apart this way).
  """
  t, p = truth.astype(bool), prediction.astype(bool)
  ridge = ndimage.maximum_filter(ndimage.distance_transform_edt(t), size=5)
  out = {}
  for d, name in WIDTH_BINS:
    band = t & ((ridge >= d) if d == WIDTH_BINS[-1][0] else (np.round(ridge) == d))
    out[f'true_{name}'], out[f'hit_{name}'] = int(band.sum()), int((band & p).sum())
  return out


def edges(loaded: restore.LoadedRun, role: str = 'test', *, per_image: bool = False, widths: bool = False) -> dict:
  """Means over the split's images of `image_scores` (HD95: the median over images with both a
  non-empty prediction and truth; `empty`: the rate of empty predictions).

  With `per_image`, also `<name>_per_image` for each of `PER_IMAGE`: the list of the images'
  values in the order of their ids (rounded to 6 digits), so that runs pair image by image
  (the hierarchical bootstrap over seeds, then images). With `widths` (thin structures such as
  roads), also `recall_width_<bin>`: the share of the split's true foreground pixels of each
  width bin (`width_counts`) that the model predicts, pooled over images.
  """
  eval_fn = parallel.compile_eval(steps.eval_step, loaded.mesh)
  rows, counts, ids, valid = [], [], [], []
  for batch, out in loaded.map_split(eval_fn, role):
    for prediction, truth in zip(out['predictions'], batch['mask'], strict=True):
      rows.append(image_scores(prediction == 1, truth == 1))
      if widths:
        counts.append(width_counts(prediction == 1, truth == 1))
    ids.extend(str(i) for i in batch['id'])
    valid.append(batch['valid'])
  table = {name: np.asarray([row[name] for row in rows]) for name in rows[0]}
  if widths:
    table.update({name: np.asarray([row[name] for row in counts]) for name in counts[0]})
  table['valid'] = np.concatenate(valid)
  gathered = evaluation.gather_rows(table, ids)
  out = {name: float(np.nanmean(gathered[name])) for name in rows[0] if name != 'hd95'}
  hd95 = gathered['hd95'][~np.isnan(gathered['hd95'])]
  out['hd95_median'] = float(np.median(hd95)) if hd95.size else float('nan')
  if widths:
    for _, name in WIDTH_BINS:
      true = int(gathered[f'true_{name}'].sum())
      out[f'recall_width_{name}'] = float(gathered[f'hit_{name}'].sum()) / true if true else float('nan')
  if per_image:
    order = np.argsort(gathered['id'], kind='stable')
    out.update({f'{name}_per_image': [round(float(v), 6) for v in gathered[name][order]] for name in PER_IMAGE})
  return out


def class_dice(loaded: restore.LoadedRun, role: str = 'test') -> dict[str, float]:
  """`class_dice_<k>`: class k's Dice per image (`metrics.class_scores`: 1 where the class is
  absent from both), averaged over the split's images; for `synthetic_cells/three_class_*`
  class 2 is the cell boundary, the 1-2 px borders between touching cells included."""
  per_image = loaded.evaluate(role)
  means = np.asarray(per_image['class_dice'], np.float64).mean(0)
  return {f'class_dice_{k}': float(value) for k, value in enumerate(means)}


def skip_means(loaded: restore.LoadedRun, role: str = 'train') -> list[np.ndarray]:
  """Each level's skip tensor averaged over the split's images and pixels, `[C_level]` float32,
  level 0 first (`steps.skip_means_step`): the fill of a mean-ablation."""
  means_fn = parallel.compile_eval(steps.skip_means_step, loaded.mesh)
  rows: dict[str, list] = {}
  valid, ids = [], []
  for batch, out in loaded.map_split(means_fn, role):
    for name, value in out.items():
      rows.setdefault(name, []).append(value)
    valid.append(batch['valid'])
    ids.extend(str(i) for i in batch['id'])
  table = evaluation.gather_rows(
    {**{k: np.concatenate(v) for k, v in rows.items()}, 'valid': np.concatenate(valid)}, ids
  )
  return [table[f'skip_{level}'].mean(0).astype(np.float32) for level in range(len(rows))]


def knockouts(loaded: restore.LoadedRun, role: str, model_config: models.ModelConfig) -> dict[str, dict[str, list]]:
  """The study's knock-outs (the module docstring), each kind scored on `role` ('dice') and on
  validation ('val_dice'); a `runner.run_population` knock-out function."""
  roles = {'dice': role, 'val_dice': 'validation'}
  out = runner.measure_knockouts(loaded, role, model_config, roles)

  def like(kind: str, **scales) -> dict[str, list]:  # `kind`'s rows, scored with other scales
    scored = {key: runner.knockout_dice(loaded, split, scales).tolist() for key, split in roles.items()}
    return {'labels': out[kind]['labels'], 'scales': out[kind]['scales'], **scored}

  extra = {}
  if 'skip' in out:
    masks = np.asarray(out['skip']['scales'], np.float32)
    fill = [np.broadcast_to(mean, (len(masks), mean.size)) for mean in skip_means(loaded)]
    extra['skip_mean'] = like('skip', skip_scale=masks, skip_fill=fill)
  if 'residual' in out:
    extra['branch'] = like('residual', branch_scale=np.asarray(out['residual']['scales'], np.float32))
  order = ('skip', 'skip_mean', 'gate', 'prune', 'residual', 'branch')  # the order of the committed results
  merged = {**out, **extra}
  return {kind: merged[kind] for kind in order if kind in merged}
