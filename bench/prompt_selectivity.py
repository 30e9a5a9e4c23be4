r"""Does the prompt choose the change? Per-prompt F1, selectivity and paraphrases of trained models.

  python bench/prompt_selectivity.py --run runs/demo_prompts --baseline runs/demo \
      --picture docs/images/prompt_masks.png

On the synthetic scenes' split (`--data`, default the demo_prompts test split with its per-prompt
targets, segchange_jax/data/synthetic.py), every run in `--run` answers all seven trained prompts
and the paraphrases below for every pair in ONE model pass per pair (`predict(prompts=...)`).
Reported per run (pixels pooled over the split, the model's threshold):
- F1 of each trained prompt against its target (a prompt whose kind did not change in a pair
  has an empty target there), and their macro mean over the six kind prompts;
- off-target share: of the pixels a kind prompt marks, the share inside another kind's or
  direction's change and outside its own target (target <= 10 %);
- negative / positive area: the mean marked area for (pair, prompt) where the prompt's kind did
  not change, over the mean where it did (target <= 2 %);
- where each kind prompt marks: the share of its marked pixels inside each target and in no
  change (new vs demolished buildings side by side shows whether the DIRECTION is selected);
- paraphrases: F1 of prompts worded unlike any training prompt, against the target of the
  trained prompt they paraphrase, next to that prompt's F1.
`--baseline` runs (models trained on the union label) are scored on "any change" (their own
config prompt), the figure the prompt-trained model must not lose by more than 0.03.
Several `--run`s (e.g. `--config.seed` 1, 2, 3 of one config) also get the mean, min and max of
the headline figures over the runs: at the demo's budget the seed moves them a lot.
`--picture`: one test scene, A / B and four prompts' masks (green: marked and in the target,
red: marked outside it, blue: target missed), written as a PNG.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from _common import REPO  # noqa: F401  (puts the repository on sys.path)

PARAPHRASES = {
    'new buildings': ['newly constructed houses', 'buildings that were built'],
    'demolished buildings': ['buildings that were torn down', 'houses that disappeared'],
    'new roads': ['a newly paved street'],
    'removed roads': ['roads that are gone'],
    'new mounds': ['piles of earth that appeared'],
    'removed mounds': ['heaps of soil that were cleared away'],
    'any change': ['anything that is different'],
}


def load_split(data: str) -> list[dict]:
  """[{'name', 'a', 'b', 'targets': {prompt: bool mask}}] of a synthetic split folder."""
  import cv2  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(data, 'targets.json')):
    raise SystemExit(f'{data} has no targets.json: generate the split with targets '
                     '(python -m data_prep.synthetic) or pass --data')
  with open(os.path.join(data, 'targets.json'), encoding='utf-8') as f:
    listing = json.load(f)
  if not listing:
    raise SystemExit(f'{data}/targets.json lists no pairs: generate the split with targets '
                     '(python -m data_prep.synthetic) or pass --data')
  pairs = []
  for name, targets in sorted(listing.items()):
    read = lambda sub: cv2.imread(os.path.join(data, sub, name), cv2.IMREAD_COLOR)[..., ::-1]
    pairs.append(dict(name=name, a=read('A'), b=read('B'), targets={
        p: cv2.imread(os.path.join(data, rel), cv2.IMREAD_GRAYSCALE) > 0
        for p, rel in targets.items()}))
  return pairs


def _f1(tp: float, fp: float, fn: float) -> float:
  return 2 * tp / max(2 * tp + fp + fn, 1)


def score(masks: list[dict], pairs: list[dict], kinds: list[str], union: str) -> dict:
  """Figures of one model's masks [{prompt: bool [H, W]}] (one dict per pair)."""
  counts = {p: np.zeros(3) for p in masks[0]}   # tp, fp, fn per asked prompt
  off, marked = {p: 0 for p in kinds}, {p: 0 for p in kinds}
  where = {p: np.zeros(len(kinds) + 1) for p in kinds}   # marked pixels in each target, none
  neg_area, pos_area = [], []
  neg_marked = neg_on_change = neg_marking = 0   # negatives: pixels, on a change, any pixel
  for pair, pred in zip(pairs, masks):
    empty = np.zeros_like(pair['targets'][union])
    for prompt, m in pred.items():
      t = pair['targets'].get(_trained(prompt), empty)
      counts[prompt] += [np.sum(m & t), np.sum(m & ~t), np.sum(~m & t)]
    for p in kinds:
      m = pred[p]
      t = pair['targets'].get(p, empty)
      others = np.zeros_like(t)
      for q in kinds:
        if q != p and q in pair['targets']:
          others |= pair['targets'][q]
      off[p] += int(np.sum(m & others & ~t))
      marked[p] += int(np.sum(m))
      where[p] += [np.sum(m & pair['targets'][q]) if q in pair['targets'] else 0
                   for q in kinds] + [np.sum(m & ~pair['targets'][union])]
      if p in pair['targets']:
        pos_area.append(float(m.mean()))
      else:
        neg_area.append(float(m.mean()))
        neg_marked += int(np.sum(m))
        neg_on_change += int(np.sum(m & pair['targets'][union]))
        neg_marking += int(np.any(m))
  f1 = {p: _f1(*c) for p, c in counts.items()}
  out = {'f1': f1, 'macro_f1_kinds': float(np.mean([f1[p] for p in kinds])),
         'off_target': {p: off[p] / max(marked[p], 1) for p in kinds},
         'off_target_all': sum(off.values()) / max(sum(marked.values()), 1),
         # where[p][q]: share of p's marked pixels inside target q (kinds order), then none
         'where': {p: (where[p] / max(marked[p], 1)).tolist() for p in kinds},
         'positive_area': float(np.mean(pos_area)), 'negative_area': float(np.mean(neg_area)),
         'counts': {'positive': len(pos_area), 'negative': len(neg_area)},
         # negatives that mark any pixel, and the share of their pixels on another change
         'negatives_marking': neg_marking,
         'negative_pixels_on_change': neg_on_change / max(neg_marked, 1)}
  out['negative_over_positive'] = out['negative_area'] / max(out['positive_area'], 1e-12)
  return out


HEADLINE = (('f1_any_change', '"any change" F1'), ('macro_f1_kinds', 'macro F1, 6 kinds'),
            ('off_target_all', 'off-target share'),
            ('negative_over_positive', 'negative / positive area'))


def spread(scores: list[dict], union: str) -> dict:
  """Mean, min and max of the headline figures over several runs (e.g. seeds of one config).

  At the demo's budget a seed moves these figures more than most design changes
  (bench/README.md), so a config is reported over its seeds.
  """
  out = {}
  for key, _ in HEADLINE:
    values = [s['f1'][union] if key == 'f1_any_change' else s[key] for s in scores]
    out[key] = {'mean': float(np.mean(values)), 'min': float(np.min(values)),
                'max': float(np.max(values)), 'runs': len(values)}
  return out


def _trained(prompt: str) -> str:
  """The trained prompt a paraphrase stands for (itself for a trained prompt)."""
  for trained, words in PARAPHRASES.items():
    if prompt == trained or prompt in words:
      return trained
  return prompt


def detector(run: str):
  """The ChangeDetector of a training workdir (its checkpoints/) or of a checkpoint path."""
  from segchange_jax.inference import predictor  # pylint: disable=g-import-not-at-top
  ckpt = os.path.join(run, 'checkpoints')
  return predictor.ChangeDetector.from_checkpoint(ckpt if os.path.isdir(ckpt) else run)


def nearest(vectors: dict[str, np.ndarray], trained: list[str]) -> dict[str, tuple]:
  """{paraphrase: (nearest trained prompt, its cosine, the cosine to the prompt it stands for)}.

  `vectors`: a [T, L] (or [L]) text embedding per prompt; compared as the mean token vector,
  which is what the mask head reads of a prompt.
  """
  unit = {}
  for p, v in vectors.items():
    v = np.asarray(v, np.float64).reshape(-1, np.shape(v)[-1]).mean(0)
    unit[p] = v / max(np.linalg.norm(v), 1e-12)
  out = {}
  for p in vectors:
    if p in trained:
      continue
    cos = {q: float(unit[p] @ unit[q]) for q in trained}
    best = max(cos, key=cos.get)
    out[p] = (best, cos[best], cos[_trained(p)])
  return out


def predict_all(det, pairs: list[dict], prompts: list[str]) -> list[dict]:
  """Masks {prompt: bool [H, W]} per pair from ChangeDetector `det`, all prompts in one pass."""
  out = []
  for pair in pairs:
    pred = det.predict(pair['a'], pair['b'], prompts=prompts)
    out.append({p: pred[p].mask == 1 for p in prompts})
  return out


def picture(path: str, pair: dict, masks: dict, prompts: list[str]) -> None:
  """A | B | one panel per prompt (green hit, red marked outside the target, blue missed)."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = pair['a'].shape[:2]
  scale = 3
  panels, titles = [pair['a'], pair['b']], ['A (before)', 'B (after)']
  for p in prompts:
    t = pair['targets'].get(p, np.zeros((h, w), bool))
    m = masks[p]
    img = (0.45 * pair['b']).astype(np.uint8)
    img[m & t] = (40, 200, 40)
    img[m & ~t] = (220, 40, 40)
    img[~m & t] = (40, 90, 230)
    panels.append(img)
    titles.append(f'"{p}"' + ('' if p in pair['targets'] else ' (absent)'))
  big = [cv2.resize(np.ascontiguousarray(x), (w * scale, h * scale),
                    interpolation=cv2.INTER_NEAREST) for x in panels]
  pad = 36
  canvas = np.full((h * scale + pad, len(big) * (w * scale + 8), 3), 255, np.uint8)
  for i, (x, title) in enumerate(zip(big, titles)):
    x0 = i * (w * scale + 8)
    canvas[pad:, x0:x0 + w * scale] = x
    cv2.putText(canvas, title, (x0 + 4, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  cv2.imwrite(path, canvas[..., ::-1])


def main():
  from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--run', nargs='+', required=True, help='workdirs of prompt-trained models')
  p.add_argument('--baseline', nargs='*', default=[], help='workdirs of union-label models')
  p.add_argument('--data', default='data/demo_prompts/test')
  p.add_argument('--picture', default='', help='PNG: one scene, four prompts (first --run)')
  p.add_argument('--picture_pair', type=int, default=-1,
                 help='index of the scene to draw (default: the first with >= 2 kinds changed)')
  p.add_argument('--json', default='', help='also write every figure here')
  args = p.parse_args()
  for run in (*args.run, *args.baseline):
    if not os.path.exists(run):
      raise SystemExit(f'{run} does not exist: pass a training workdir or a checkpoint path')

  pairs = load_split(args.data)
  kinds = list(synthetic.TARGET_NAMES.values())
  union = synthetic.ANY_CHANGE
  trained = [*kinds, union]
  asked = trained + [x for words in PARAPHRASES.values() for x in words]
  report = {'pairs': len(pairs), 'runs': {}, 'baselines': {}}
  first_masks = None
  first = detector(args.run[0])   # its text encoder also places the paraphrases
  neighbours = nearest({p: first.embed(p)[0] for p in asked}, trained)
  report['text_neighbours'] = {p: dict(nearest=n, cosine=c, cosine_own=o)
                               for p, (n, c, o) in neighbours.items()}
  for run in args.run:
    masks = predict_all(first if run == args.run[0] else detector(run), pairs, asked)
    first_masks = first_masks or masks
    s = score(masks, pairs, kinds, union)
    report['runs'][run] = s
    print(f'\n== {run} ({len(pairs)} pairs; {s["counts"]["positive"]} positive and '
          f'{s["counts"]["negative"]} negative (pair, kind prompt))')
    print(f'{"prompt":<24}{"F1":>7}{"off-target":>12}')
    for q in trained:
      off = f'{100 * s["off_target"][q]:>11.1f}%' if q in kinds else f'{"":>12}'
      print(f'{q:<24}{s["f1"][q]:>7.3f}{off}')
    print(f'macro F1 (6 kinds) {s["macro_f1_kinds"]:.3f}; off-target overall '
          f'{100 * s["off_target_all"]:.1f}%; marked area negative / positive '
          f'{s["negative_area"]:.4f} / {s["positive_area"]:.4f} = '
          f'{s["negative_over_positive"]:.3f}')
    print(f'negative prompts: {s["negatives_marking"]} of {s["counts"]["negative"]} mark any '
          f'pixel; {100 * s["negative_pixels_on_change"]:.0f}% of their marked pixels lie on '
          'another change')
    print('where each kind prompt marks (share of its marked pixels in each target; a pixel '
          'in two targets counts in both):')
    short = [k.replace('buildings', 'bldg').replace('demolished', 'demol.').replace(
        'removed', 'rem.') for k in kinds]
    print(f'  {"prompt":<22}' + ''.join(f'{k:>12}' for k in short) + f'{"no change":>11}')
    for q in kinds:
      print(f'  {q:<22}' + ''.join(f'{v:>12.2f}' for v in s['where'][q][:-1]) +
            f'{s["where"][q][-1]:>11.2f}')
    print('paraphrase                                  F1   (trained prompt F1)   nearest '
          'trained prompt in the text encoder (cosine; to its own)')
    for q, words in PARAPHRASES.items():
      for x in words:
        near, cos, own = neighbours[x]
        print(f'  {x:<40}{s["f1"][x]:>6.3f}   ({q}: {s["f1"][q]:.3f})   {near} ({cos:.2f}; '
              f'{own:.2f})')
  for run in args.baseline:
    det = detector(run)
    prompt = det.config.data.prompt
    masks = predict_all(det, pairs, [prompt])
    tp = fp = fn = 0
    for pair, m in zip(pairs, masks):
      t = pair['targets'][union]
      m = m[prompt]
      tp, fp, fn = tp + np.sum(m & t), fp + np.sum(m & ~t), fn + np.sum(~m & t)
    report['baselines'][run] = {'prompt': prompt, 'f1_any_change': _f1(tp, fp, fn)}
    print(f'\n== baseline {run}: "{prompt}" vs the union label: F1 {_f1(tp, fp, fn):.3f}')
  if len(args.run) > 1:   # e.g. the seeds of one config
    report['spread'] = spread(list(report['runs'].values()), union)
    print(f'\n== over the {len(args.run)} runs: mean [min, max]')
    for key, label in HEADLINE:
      f = report['spread'][key]
      print(f'  {label:<26}{f["mean"]:.3f} [{f["min"]:.3f}, {f["max"]:.3f}]')
  if args.picture:
    i = args.picture_pair
    if i < 0:
      i = next((j for j, pr in enumerate(pairs)
                if sum(k in pr['targets'] for k in kinds) >= 2), 0)
    pair = pairs[i]
    present = [k for k in kinds if k in pair['targets']]
    absent = [k for k in kinds if k not in pair['targets']]
    shown = (present + absent)[:3] + [union]
    picture(args.picture, pair, first_masks[i], shown)
    print(f'\npicture: {args.picture} ({pair["name"]}: {", ".join(shown)})')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1, default=float)


if __name__ == '__main__':
  main()
