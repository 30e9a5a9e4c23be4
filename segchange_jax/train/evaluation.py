"""Scoring a checkpoint on a dataset split: metrics, per-example scores, comparison images.

The library behind `python -m segchange_jax.evaluate` (its docstring lists the outputs).
Metrics come from the training loop's own code (`train_step.eval_outputs`,
`metrics.confusion_matrix` / `compute_metrics` via `loop.evaluate_split`), so they equal what
training reports for the same checkpoint and split. With `tta` (segchange_jax/models/tta.py)
the model inside that jitted step is `tta.tta_logits` over the transforms (one model call of
T x batch records), so loss, metrics, per-example scores and images all come from the averaged
logits.

Semantic change (SECOND-style data: config.data.targets='prompts' and target prompts 'A -> B'
of the `second` layout's classes, data/layouts.py): the records carry per-prompt masks, not
the two land-cover maps, so `SemanticPlan` rebuilds both dates' class maps from the
directional prompts, for the truth and for the prediction (its docstring says exactly how),
and the split's [C, C] matrix of both dates feeds metrics.sek: 'sek' and its parts in the
metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import os
from typing import Any

import numpy as np

from segchange_jax import atomic
from segchange_jax.data import input_pipeline
from segchange_jax.data import layouts
from segchange_jax.models import tta as tta_lib

GAP = 4
GAP_GREY = 128
TP_RGB, FP_RGB, FN_RGB = (255, 255, 255), (255, 0, 0), (0, 0, 255)


class EvaluationError(ValueError):
  """The checkpoint, the config or the split cannot be evaluated; the message says why."""


def per_example_counts(cm: np.ndarray) -> dict[str, np.ndarray]:
  """[N, C, C] per-example confusion matrices -> tp, fp, fn of change (class != 0), iou, f1.

  Empty examples (no change in label or prediction) score 1: ranking should put them with the
  perfect ones, not with the failures (the split-level metrics keep sklearn's 0 convention).
  """
  cm = np.asarray(cm, np.int64)
  changed = cm[:, 1:, 1:]
  tp = np.trace(changed, axis1=1, axis2=2)
  wrong_class = changed.sum((1, 2)) - tp  # changed in both, wrong class: a miss and a false alarm
  fp = cm[:, 0, 1:].sum(-1) + wrong_class
  fn = cm[:, 1:, 0].sum(-1) + wrong_class
  den_iou, den_f1 = tp + fp + fn, 2 * tp + fp + fn
  iou = np.where(den_iou > 0, tp / np.maximum(den_iou, 1), 1.0)
  f1 = np.where(den_f1 > 0, 2 * tp / np.maximum(den_f1, 1), 1.0)
  return {'tp': tp, 'fp': fp, 'fn': fn, 'iou': iou, 'f1': f1}


def comparison_row(a: np.ndarray, b: np.ndarray, label: np.ndarray, pred: np.ndarray,
                   binary: bool = True) -> np.ndarray:
  """uint8 [H, 4W + 3 GAP, 3]: A | B | label | prediction overlay (colours in the docstring).

  `label` as stored (binary: any non-zero = change), `pred` the predicted class map.
  """
  true, hit = label > 0, pred > 0
  if binary:
    label, pred = true.astype(np.int32), hit.astype(np.int32)
  label_rgb = np.repeat((true * 255).astype(np.uint8)[..., None], 3, axis=-1)
  overlay = (b.astype(np.float32) * 0.4).astype(np.uint8)
  overlay[true & hit & (label == pred)] = TP_RGB
  overlay[hit & ~(true & (label == pred))] = FP_RGB
  overlay[true & ~hit] = FN_RGB
  h = a.shape[0]
  gap = np.full((h, GAP, 3), GAP_GREY, np.uint8)
  return np.concatenate([a, gap, b, gap, label_rgb, gap, overlay], axis=1)


class _Ranker:
  """Keeps the N lowest and N highest scoring examples (with their predictions)."""

  def __init__(self, n: int):
    self.n = n
    self.worst: list = []  # max-heap by score via negation: (-score, -index, index, pred)
    self.best: list = []   # min-heap: (score, -index, index, pred)

  def add(self, score: float, index: int, pred: np.ndarray) -> None:
    for heap, key in ((self.worst, -score), (self.best, score)):
      item = (key, -index, index, pred)
      if len(heap) < self.n:
        heapq.heappush(heap, item)
      elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)

  def ranked(self) -> dict[str, list[tuple[int, np.ndarray]]]:
    worst = sorted(self.worst, key=lambda t: (-t[0], t[2]))
    best = sorted(self.best, key=lambda t: (-t[0], t[2]))
    return {'worst': [(t[2], t[3]) for t in worst], 'best': [(t[2], t[3]) for t in best]}


class _TTAModel:
  """A model whose `apply` (as train_step.eval_outputs calls it) averages TTA logits."""

  def __init__(self, model, tta: str):
    self.model, self.tta = model, tta

  def apply(self, variables, image_a, image_b, text, train: bool = False):
    fn = lambda a, b, t: self.model.apply(variables, a, b, t, train=train)
    return tta_lib.tta_logits(fn, image_a, image_b, text, self.tta)


@dataclasses.dataclass(frozen=True)
class SemanticPlan:
  """How the two dates' semantic class maps are rebuilt from directional prompt slots.

  The records of the `second` layout carry, per pair, the masks of the prompts that occur
  (layouts.semantic_targets): 'any change', 'A -> B' for each (from class, to class) pair,
  'any change to B', 'any change from A'. Evaluation asks every target prompt of the split
  (slot k = prompt k of `prompts`); of those, the 'A -> B' slots (`pair_slots`, with class
  indices `from_class`, `to_class` of `classes`) define the maps:
  - truth: a pixel inside the 'A -> B' mask has class A on date 1 and B on date 2; inside none
    (unchanged, or a class in one land-cover map only, which has no directional target) both
    are 0, 'no change'. The 'A -> B' masks are disjoint, so this is the SECOND label pair
    wherever both maps have a class.
  - prediction: a pixel is changed when the 'any change' prompt's probability exceeds the
    threshold (the binary change decision; `any_slot`), or, when the split has no 'any change'
    prompt, when the highest 'A -> B' probability does; a changed pixel takes the (A, B) of its
    highest 'A -> B' logit (argmax over the pair prompts of the split), an unchanged one 0 / 0.
  Both dates' (true, predicted) counts add into one [C, C] matrix (SECOND's evaluation scores
  the two maps together), C = len(classes), class 0 'no change'.
  """
  prompts: tuple[str, ...]
  pair_slots: tuple[int, ...]
  from_class: tuple[int, ...]
  to_class: tuple[int, ...]
  any_slot: int | None
  classes: tuple[str, ...]

  @classmethod
  def of(cls, prompts, classes=layouts.SECOND_CLASSES) -> 'SemanticPlan | None':
    """The plan of the evaluated target prompts (slot order), or None when none is 'A -> B'
    of `classes`' change classes (not semantic change data: no SeK)."""
    index = {name: i for i, name, _ in classes if i}
    by_prompt = {layouts.second_prompt(a, b): (index[a], index[b]) for a in index for b in index}
    prompts = tuple(prompts)
    slots = [k for k, p in enumerate(prompts) if p in by_prompt]
    if not slots:
      return None
    any_slot = prompts.index(layouts.ANY_CHANGE) if layouts.ANY_CHANGE in prompts else None
    return cls(prompts, tuple(slots), tuple(by_prompt[prompts[k]][0] for k in slots),
               tuple(by_prompt[prompts[k]][1] for k in slots), any_slot,
               tuple(name for _, name, _ in classes))

  def class_maps(self, logits, labels, threshold: float):
    """(true date 1, true date 2, predicted date 1, predicted date 2) int32 [B, H, W] maps of
    prompt-slot logits and labels [B, H, W, P] (jax; inside jit)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    slots = jnp.asarray(self.pair_slots, jnp.int32)
    src = jnp.asarray((0,) + self.from_class, jnp.int32)  # entry 0: no change
    dst = jnp.asarray((0,) + self.to_class, jnp.int32)
    inside = jnp.take(labels, slots, axis=-1) > 0
    true_pair = jnp.where(inside.any(-1), jnp.argmax(inside, axis=-1) + 1, 0)
    z = jnp.take(logits, slots, axis=-1).astype(jnp.float32)
    change_logit = z.max(-1) if self.any_slot is None else logits[..., self.any_slot]
    changed = jax.nn.sigmoid(change_logit.astype(jnp.float32)) > threshold
    pred_pair = jnp.where(changed, jnp.argmax(z, axis=-1) + 1, 0)
    return src[true_pair], dst[true_pair], src[pred_pair], dst[pred_pair]

  def confusion(self, logits, labels, mask, threshold: float):
    """int32 [C, C] (true, predicted) counts of both dates' class maps over the valid
    examples (mask [B], 0 = padding); metrics.sek scores it."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    c = len(self.classes)
    t1, t2, p1, p2 = self.class_maps(logits, labels, threshold)
    weight = jnp.broadcast_to((mask > 0).astype(jnp.int32)[:, None, None], t1.shape)
    index = jnp.concatenate([(t1 * c + p1).reshape(-1), (t2 * c + p2).reshape(-1)])
    counts = jax.ops.segment_sum(jnp.concatenate([weight.reshape(-1)] * 2), index,
                                 num_segments=c * c)
    return counts.reshape(c, c)


def check_tta(info: dict, split: str, tta: str) -> None:
  """Refuses a `tta` the split's records cannot take (rotations of non-square records)."""
  tta_lib.resolve(tta)
  size = info['splits'][split].get('image_size')
  if size:
    try:
      tta_lib.check_shape(tta, int(size[0]), int(size[1]), f'{split!r} records')
    except tta_lib.TTAError as e:
      raise EvaluationError(f'--tta {tta}: {e} (re-convert with --tile N)') from e


def _split_records(config, split: str):
  """grain ArrayRecordDataSource of `split`, for reading examples by index."""
  import grain.python as grain  # pylint: disable=g-import-not-at-top
  info = input_pipeline.load_dataset_info(config.data.shards_dir)
  paths = [os.path.join(config.data.shards_dir, n) for n in info['splits'][split]['shards']]
  return grain.ArrayRecordDataSource(paths)


def evaluate(config, variables: dict, split: str, out_dir: str, num_images: int = 0,
             rank_by: str = 'iou', batch_size: int | None = None,
             checkpoint: str = '', tta: str = 'none') -> dict[str, Any]:
  """Scores `split`, writes metrics JSON, per-example CSV and images; returns the metrics.

  `tta`: 'none', 'flips' or 'd4' (segchange_jax/models/tta.py; 'd4' needs square records),
  recorded as the metrics' 'tta'.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import loop  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from segchange_jax.train import train_step  # pylint: disable=g-import-not-at-top

  info = input_pipeline.load_dataset_info(config.data.shards_dir)
  if split not in info['splits']:
    raise EvaluationError(f'--split {split!r} is not in {config.data.shards_dir} (it has '
                          f'{sorted(info["splits"])})')
  check_tta(info, split, tta)
  # Per-example outputs pair the global step outputs with this process's host batch, which
  # only coincide on one process; multi-process runs write the split metrics only.
  single = jax.process_count() == 1
  if num_images and not single:
    raise EvaluationError('comparison images need a single process; pass --num_images=0')
  batch_size = batch_size or config.eval.batch_size
  if num_images and config.data.targets == 'prompts':
    raise EvaluationError("comparison images show one mask per record; with "
                          "config.data.targets='prompts' pass --num_images=0 (the per-prompt "
                          'scores are in the metrics)')
  table_np, prompt_to_index = prompts.dataset_table(
      config, input_pipeline.prompt_table_info(config, info))
  mesh = sharding.create_mesh(config)
  model = segchange.build_model(config)
  if tta != 'none':
    model = _TTAModel(model, tta)
  var_shardings = sharding.param_shardings(variables, mesh, config)
  variables = jax.device_put(dict(variables), var_shardings)
  rep = sharding.replicated(mesh)
  text_table = jax.device_put(table_np, rep)
  threshold = config.eval.threshold
  plan = (SemanticPlan.of(input_pipeline.target_prompts(config, info))
          if config.data.targets == 'prompts' else None)

  def step(variables, batch, text_table):
    out, logits = train_step.eval_outputs(model, config, variables, batch, text_table)
    if plan is not None:  # summed exactly by loop.evaluate_split, scored by metrics.sek
      out['semantic_cm'] = plan.confusion(logits, batch['label'], batch['mask'], threshold)
    if not single:
      return out
    per_cm = jax.vmap(lambda z, y, m: metrics_lib.confusion_matrix(
        z[None], y[None], m[None], threshold=threshold))(logits, batch['label'], batch['mask'])
    out['per_example'] = {'cm': per_cm}
    if num_images:
      out['per_example']['pred'] = metrics_lib.predictions(logits, threshold).astype('uint8')
    return out

  step = jax.jit(step, in_shardings=(var_shardings, sharding.batch_sharding(mesh), rep),
                 out_shardings=rep)
  cms, ranker = [], _Ranker(num_images)

  def on_batch(batch, per_example):
    valid = np.asarray(batch['mask']) > 0
    cm = np.asarray(per_example['cm'])[valid]
    scores = per_example_counts(cm)[rank_by]
    if num_images:
      preds = np.asarray(per_example['pred'])[valid]
      for k, (score, pred) in enumerate(zip(scores, preds)):  # examples, not pixels
        ranker.add(float(score), len(cms) + k, pred)
    cms.extend(cm)

  result = loop.evaluate_split(step, variables, config, split, prompt_to_index, text_table,
                                  mesh, batch_size, on_batch=on_batch if single else None)
  result.update({'checkpoint': checkpoint, 'split': split, 'threshold': float(threshold),
                 'tta': tta})
  if plan is not None:
    result['semantic_classes'] = list(plan.classes)
  if jax.process_index() != 0:
    return result
  os.makedirs(out_dir, exist_ok=True)
  with atomic.atomic_open(os.path.join(out_dir, f'metrics_{split}.json')) as f:
    json.dump(result, f, indent=2, default=float)
  if not single:
    return result
  source = _split_records(config, split)
  _write_per_example(os.path.join(out_dir, f'per_example_{split}.csv'), np.stack(cms), source)
  if num_images:
    _write_images(os.path.join(out_dir, 'images'), ranker.ranked(), source, rank_by,
                  per_example_counts(np.stack(cms))[rank_by], config.model.num_classes == 1)
  return result


def _write_per_example(path: str, cms: np.ndarray, source) -> None:
  from segchange_jax.data import records  # pylint: disable=g-import-not-at-top
  counts = per_example_counts(cms)
  with atomic.atomic_open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['index', 'file_name', 'tp', 'fp', 'fn', 'iou', 'f1'])
    for i in range(len(cms)):
      name = records.parse(source[i])['file_name']
      w.writerow([i, name, *(int(counts[k][i]) for k in ('tp', 'fp', 'fn')),
                  f'{counts["iou"][i]:.6f}', f'{counts["f1"][i]:.6f}'])


def _write_images(folder: str, ranked: dict, source, rank_by: str, scores: np.ndarray,
                  binary: bool) -> None:
  import cv2  # pylint: disable=g-import-not-at-top

  from segchange_jax.data import records  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  for kind, items in ranked.items():
    for rank, (index, pred) in enumerate(items):
      ex = records.decode(source[index], targets=False)
      row = comparison_row(ex['image_a'], ex['image_b'], ex['label'], pred, binary)
      stem = os.path.splitext(os.path.basename(ex['file_name']))[0]
      name = f'{kind}_{rank:02d}_{stem}_{rank_by}{scores[index]:.3f}.png'
      with atomic.atomic_path(os.path.join(folder, name)) as tmp:
        if not cv2.imwrite(tmp, row[..., ::-1]):
          raise OSError(f'could not write {os.path.join(folder, name)}')
