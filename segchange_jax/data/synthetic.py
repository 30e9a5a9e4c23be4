"""Deterministic synthetic bi-temporal scenes in the SegChange "default" layout.

The library behind `python -m data_prep.synthetic`; `segchange_jax.data.shards` also calls it
to create the demo data on first use.

Each scene has a textured background and objects (buildings with a two-tone roof and a cast
shadow, roads, mounds). Some objects exist in only one of the two dates: their footprints are
the change label (255). The B image also gets changes that must NOT be labelled: a global
brightness/colour gain and offset, haze, sensor noise and a sub-pixel misregistration
(<= 1 px). Scene i depends only on (seed, i), so any subset regenerates bit-identically.
Output: `{train,val,test}/{A,B,label}/<split>_<i>.png` and `{split}/prompts.txt`.

Per-prompt targets (beside the layout; readers that do not know them ignore them): one mask per
(kind, direction) that occurs in the scene, "new buildings" (a building only in B),
"demolished buildings" (only in A), "new roads", "removed roads", "new mounds", "removed mounds",
plus "any change" (always written: the label, empty for a scene without changes). A pixel is in
a kind's target when the top object there, in the date that has it, is an object of that kind
that exists only in that date; so the union of the kind targets is exactly the label, and a
pixel where a new road covers a demolished building is in both of their targets.
`PROMPT_VOCABULARY` lists every target prompt (training draws negative prompts from it).
On disk: `{split}/targets/<stem>/<slug>.png` (uint8 0/255, slug = the prompt with '_' for
spaces, e.g. `train_00003/new_buildings.png`) and `{split}/targets.json`,
`{file name: {prompt: mask path relative to the split folder}}`, read by the segchange-default
layout (`segchange_jax.data.layouts`).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import cv2
import numpy as np

SPLITS = (('train', 0.70), ('val', 0.15), ('test', 0.15))
KINDS = ('building', 'road', 'mound')
PROMPT_NAMES = {'building': 'Buildings with changes', 'road': 'Road changes',
                'mound': 'Mound changes'}
# Target prompt of each (kind, direction); direction 'new' = only in B, 'removed' = only in A.
TARGET_NAMES = {('building', 'new'): 'new buildings',
                ('building', 'removed'): 'demolished buildings',
                ('road', 'new'): 'new roads', ('road', 'removed'): 'removed roads',
                ('mound', 'new'): 'new mounds', ('mound', 'removed'): 'removed mounds'}
ANY_CHANGE = 'any change'
# Every prompt a synthetic target can carry, in the order targets are written.
PROMPT_VOCABULARY = (*TARGET_NAMES.values(), ANY_CHANGE)
TARGETS_FILE = 'targets.json'
TARGETS_DIR = 'targets'


def _value_noise(rng: np.random.Generator, size: int, octaves: Sequence[int]) -> np.ndarray:
  """Smooth [size, size] noise in ~[0, 1]: sum of bicubically upsampled random grids."""
  out = np.zeros((size, size), np.float32)
  for weight, cells in enumerate(octaves, start=1):
    grid = rng.random((cells, cells), dtype=np.float32)
    out += cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC) / weight
  out -= out.min()
  return out / max(float(out.max()), 1e-6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Float [size, size, 3] ground texture (fields/soil mix plus fine grain)."""
  mix = _value_noise(rng, size, (4, 8, 32))[..., None]
  grass = np.array([70, 105, 60], np.float32) * rng.uniform(0.85, 1.15, 3)
  soil = np.array([150, 130, 100], np.float32) * rng.uniform(0.85, 1.15, 3)
  grain = (rng.standard_normal((size, size, 1), dtype=np.float32) * 6.0)
  return mix * grass + (1 - mix) * soil + grain


def _object(rng: np.random.Generator, size: int) -> dict:
  """Random object geometry and colours."""
  kind = KINDS[rng.choice(3, p=(0.6, 0.2, 0.2))]
  obj = {'kind': kind}
  if kind == 'building':
    w, h = rng.uniform(0.06, 0.18, 2) * size
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    box = ((float(cx), float(cy)), (float(w), float(h)), float(rng.uniform(0, 90)))
    obj['poly'] = cv2.boxPoints(box).astype(np.int32)
    obj['color'] = rng.choice([[190, 80, 70], [200, 200, 205], [110, 110, 125], [170, 150, 120]])
    obj['shadow'] = int(rng.integers(2, max(3, size // 40)))
  elif kind == 'road':
    pts = rng.uniform(-0.1, 1.1, (2, 2)) * size
    obj['line'] = pts.astype(np.int32)
    obj['width'] = int(rng.integers(max(2, size // 60), max(3, size // 25)))
    obj['color'] = np.array([105, 105, 100]) + rng.integers(-10, 10, 3)
  else:
    obj['center'] = tuple(int(v) for v in rng.uniform(0.1, 0.9, 2) * size)
    obj['axes'] = tuple(int(v) for v in rng.uniform(0.04, 0.12, 2) * size)
    obj['angle'] = float(rng.uniform(0, 180))
    obj['color'] = np.array([120, 90, 60]) + rng.integers(-15, 15, 3)
  return obj


def _footprint(obj: dict, size: int) -> np.ndarray:
  mask = np.zeros((size, size), np.uint8)
  if obj['kind'] == 'building':
    cv2.fillPoly(mask, [obj['poly']], 1)
  elif obj['kind'] == 'road':
    (x0, y0), (x1, y1) = obj['line']
    cv2.line(mask, (int(x0), int(y0)), (int(x1), int(y1)), 1, obj['width'])
  else:
    cv2.ellipse(mask, obj['center'], obj['axes'], obj['angle'], 0, 360, 1, -1)
  return mask.astype(bool)


def _render(background: np.ndarray, objects: list[dict], masks: list[np.ndarray],
            present: np.ndarray, shade: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Draws present objects in order -> (float image, top-object id map, -1 = ground)."""
  img = background.copy()
  ids = np.full(background.shape[:2], -1, np.int32)
  for i, (obj, mask) in enumerate(zip(objects, masks)):
    if not present[i]:
      continue
    if obj['kind'] == 'building':
      d = obj['shadow']
      shadow = np.roll(mask, (d, d), axis=(0, 1)) & ~mask
      img[shadow] *= 0.55
      # Two-tone roof: the ridge splits it along the diagonal ramp `shade`.
      tone = np.where(shade[mask] > 0, 1.0, 0.8)[:, None]
      img[mask] = obj['color'] * tone
    elif obj['kind'] == 'mound':
      img[mask] = obj['color'] * (0.9 + 0.2 * shade[mask, None])
    else:
      img[mask] = obj['color']
    ids[mask] = i
  return img, ids


def prompt_slug(prompt: str) -> str:
  """File stem of a target prompt's mask ('new buildings' -> 'new_buildings')."""
  return '_'.join(prompt.lower().split()).replace('/', '_')


def make_scene(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """Scene `index` -> (A [S,S,3] uint8, B, label [S,S] uint8 in {0,255}, prompt)."""
  return make_scene_with_targets(seed, index, size)[:4]


def make_scene_with_targets(
    seed: int, index: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, dict[str, np.ndarray]]:
  """`make_scene` plus its targets {prompt: [S,S] uint8 0/255} in `PROMPT_VOCABULARY` order."""
  rng = np.random.default_rng([seed, index])
  background = _background(rng, size)
  n = int(rng.integers(3, 9))
  objects = [_object(rng, size) for _ in range(n)]
  masks = [_footprint(o, size) for o in objects]
  # 0: in both, 1: only in A (vanished), 2: only in B (appeared); ~half the objects change.
  state = rng.choice(3, size=n, p=(0.5, 0.25, 0.25))
  yy, xx = np.mgrid[0:size, 0:size]
  shade = np.sin((xx - yy) * (2 * np.pi / max(8, size // 8))).astype(np.float32)
  img_a, ids_a = _render(background, objects, masks, state != 2, shade)
  img_b, ids_b = _render(background, objects, masks, state != 1, shade)
  label = (ids_a != ids_b).astype(np.uint8) * 255

  # Irrelevant changes on B: radiometry, haze, noise, misregistration (<= 1 px, subpixel).
  gain = rng.uniform(0.8, 1.2) * rng.uniform(0.93, 1.07, 3)
  img_b = img_b * gain + rng.uniform(-15, 15)
  haze = rng.uniform(0.0, 0.25) * _value_noise(rng, size, (2, 3))[..., None]
  img_b = img_b * (1 - haze) + 200.0 * haze
  img_b += rng.standard_normal(img_b.shape, dtype=np.float32) * rng.uniform(1, 5)
  shift = np.array([[1, 0, rng.uniform(-1, 1)], [0, 1, rng.uniform(-1, 1)]], np.float32)
  img_b = cv2.warpAffine(img_b.astype(np.float32), shift, (size, size),
                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
  img_a = img_a + rng.standard_normal(img_a.shape, dtype=np.float32) * 2.0
  to8 = lambda x: np.clip(np.rint(x), 0, 255).astype(np.uint8)

  changed = sorted({objects[i]['kind'] for i in range(n) if state[i] and label[masks[i]].any()},
                   key=KINDS.index)
  prompt = ', '.join(PROMPT_NAMES[k] for k in changed) + '.' if changed else 'No changes.'
  return to8(img_a), to8(img_b), label, prompt, _targets(objects, state, ids_a, ids_b, label)


def _targets(objects: list[dict], state: np.ndarray, ids_a: np.ndarray, ids_b: np.ndarray,
             label: np.ndarray) -> dict[str, np.ndarray]:
  """{prompt: 0/255 mask} of each (kind, direction) that occurs, then 'any change'."""
  # Object id -> kind index (-1 for ground), state 1: only in A, 2: only in B.
  kind_of = np.array([KINDS.index(o['kind']) for o in objects] + [-1])
  state_of = np.append(state, 0)
  out = {}
  for (kind, direction), prompt in TARGET_NAMES.items():
    ids, only = (ids_b, 2) if direction == 'new' else (ids_a, 1)
    mask = (kind_of[ids] == KINDS.index(kind)) & (state_of[ids] == only)
    if mask.any():
      out[prompt] = mask.astype(np.uint8) * 255
  out[ANY_CHANGE] = label.copy()
  return out


def split_sizes(n: int) -> list[tuple[str, int]]:
  """70/15/15 split sizes (train takes the remainder)."""
  val = int(round(n * SPLITS[1][1]))
  test = int(round(n * SPLITS[2][1]))
  return [('train', n - val - test), ('val', val), ('test', test)]


def generate(out: str, n: int, size: int, seed: int) -> dict[str, int]:
  """Writes n scenes under `out` in the SegChange default layout; returns counts per split."""
  index = 0
  counts = {}
  for split, count in split_sizes(n):
    for sub in ('A', 'B', 'label'):
      os.makedirs(os.path.join(out, split, sub), exist_ok=True)
    lines, listing = [], {}
    for _ in range(count):
      a, b, label, prompt, targets = make_scene_with_targets(seed, index, size)
      name = f'{split}_{index:05d}.png'
      for sub, img in (('A', a), ('B', b)):
        cv2.imwrite(os.path.join(out, split, sub, name), img[..., ::-1])
      cv2.imwrite(os.path.join(out, split, 'label', name), label)
      lines.append(f'{name}  {prompt}\n')
      listing[name] = _write_targets(os.path.join(out, split), name, targets)
      index += 1
    with open(os.path.join(out, split, 'prompts.txt'), 'w', encoding='utf-8') as f:
      f.writelines(lines)
    with open(os.path.join(out, split, TARGETS_FILE), 'w', encoding='utf-8') as f:
      json.dump(listing, f, indent=1)
    counts[split] = count
  return counts


def _write_targets(split_dir: str, name: str, targets: dict[str, np.ndarray]) -> dict[str, str]:
  """Writes one scene's target masks; returns {prompt: path relative to split_dir}."""
  folder = os.path.join(TARGETS_DIR, os.path.splitext(name)[0])
  os.makedirs(os.path.join(split_dir, folder), exist_ok=True)
  paths = {}
  for prompt, mask in targets.items():
    rel = os.path.join(folder, prompt_slug(prompt) + '.png').replace(os.sep, '/')
    cv2.imwrite(os.path.join(split_dir, rel), mask)
    paths[prompt] = rel
  return paths
