"""Readers of the raw change-detection layouts: each lists the pairs of one split.

`REGISTRY` is the one list of layouts: `--layout` of data_prep.convert, its --help and the
validation of `config.data.layout` all read it. A reader is registered with
`@register_layout(name, description)` and called as `reader(root, split, num_splits)`; its
docstring describes the folder structure. A reader never checks files: it returns the paths a
pair should have and the converter reports each missing or bad one by name. A name present in B
or label but not in A is listed too (its A path does not exist), so that it is reported rather
than dropped.

Per-prompt targets: a pair may carry several (prompt, mask) targets besides its one label.
segchange-default reads them from `{split}/targets.json` when present (`{file name: {prompt:
mask path relative to the split folder}}`, what `segchange_jax.data.synthetic` writes); the
`second` layout derives them from its two land-cover maps (`semantic_targets`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Callable

import numpy as np

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')


class LayoutError(ValueError):
  """The root does not look like the layout; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class Pair:
  """One bi-temporal pair as found on disk (paths may not exist: the converter checks)."""
  name: str
  a: str
  b: str
  label: str
  prompt: str = ''
  # changefine-json: (height, width, [(value, rle), ...]) used when `label` is missing.
  rle: tuple | None = None
  # Per-prompt targets: (prompt, mask path) pairs, written into the record beside the label.
  targets: tuple[tuple[str, str], ...] = ()
  # second: (label1, label2) colour-coded land-cover maps of the two dates; the converter
  # derives the binary label and the targets from them (`semantic_targets`).
  semantic: tuple[str, str] | None = None


# reader(root, split, num_splits) -> the split's pairs; num_splits is how many splits the run
# converts (a flat root that holds one split needs it).
Reader = Callable[[str, str, int], list[Pair]]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A registered layout: its reader and the one line `--layout` help shows for it."""
  name: str
  reader: Reader
  description: str


# layout name -> Layout, in registration order.
REGISTRY: dict[str, Layout] = {}


def register_layout(name: str, description: str) -> Callable[[Reader], Reader]:
  """Decorator registering `reader(root, split, num_splits) -> list[Pair]` as layout `name`.

  `description` is one line for --help (the folder structure in short). A name registered
  twice is an error, so two readers never compete for one `--layout` value.
  """
  if not isinstance(name, str) or not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', name):
    raise ValueError(f'layout name {name!r}: use letters, digits, "-", "_" or "." (it is a '
                     'command-line value)')
  if not isinstance(description, str) or not description.strip() or '\n' in description:
    raise ValueError(f'layout {name!r}: the description must be one non-empty line')

  def decorate(reader: Reader) -> Reader:
    if not callable(reader):
      raise TypeError(f'layout {name!r}: the reader must be callable, got {reader!r}')
    if name in REGISTRY:
      old = REGISTRY[name].reader
      raise ValueError(f'layout {name!r} is already registered (by '
                       f'{old.__module__}.{old.__qualname__})')
    REGISTRY[name] = Layout(name, reader, description.strip())
    return reader
  return decorate


def layout_names() -> tuple[str, ...]:
  """The registered layout names, in registration order."""
  return tuple(REGISTRY)


def help_text() -> str:
  """One line per registered layout, `name: description`, for --help."""
  return '\n'.join(f'{layout.name}: {layout.description}' for layout in REGISTRY.values())


def read_prompts(path: str) -> dict[str, str]:
  """prompts.txt lines `<file name><two spaces><prompt>` -> {name: prompt} ({} if absent)."""
  if not os.path.isfile(path):
    return {}
  prompts = {}
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip('\r\n')
      if not line.strip():
        continue
      parts = re.split(r'\s{2,}|\t', line.strip(), maxsplit=1)
      if len(parts) != 2:
        raise LayoutError(f'{path}:{lineno}: expected "<file name><two spaces><prompt>", '
                          f'got {line!r}')
      prompts[parts[0]] = parts[1].strip()
  return prompts


def read_name_list(path: str) -> list[str]:
  """A list file (one file name or path a line) -> base names, in order, without duplicates."""
  if not os.path.isfile(path):
    raise LayoutError(f'list file {path} does not exist')
  names = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.strip()
      if line and not line.startswith('#'):
        # Some lists hold 'A/x.png B/x.png label/x.png' or paths: keep the first base name.
        names.append(os.path.basename(line.split()[0]))
  return list(dict.fromkeys(names))


def _images_in(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    return []
  return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _match(folder: str, name: str) -> str:
  """Path of `name` in folder, or of a file with the same stem and another image extension."""
  path = os.path.join(folder, name)
  if os.path.exists(path):
    return path
  stem = os.path.splitext(name)[0]
  for ext in IMAGE_EXTENSIONS:
    for cand in (stem + ext, stem + ext.upper()):
      if os.path.exists(os.path.join(folder, cand)):
        return os.path.join(folder, cand)
  return path


def read_targets(path: str) -> dict[str, tuple[tuple[str, str], ...]]:
  """targets.json `{file name: {prompt: relative mask path}}` -> {name: ((prompt, abs path),)}.

  Paths are relative to the file's folder; {} when the file is absent.
  """
  if not os.path.isfile(path):
    return {}
  fix = ('expected {"<file name>": {"<prompt>": "<mask path relative to this folder>"}}; '
         'regenerate it (python -m data_prep.synthetic) or fix it by hand')
  def unique(items: list[tuple[str, object]]) -> dict:
    # json.load would keep the last of a repeated key silently: a prompt given twice is an error.
    keys = [k for k, _ in items]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
      raise LayoutError(f'{path}: {dups} given more than once in one object; give each file '
                        'name once and each of its prompts once (merge the masks of a repeated '
                        'prompt into one)')
    return dict(items)

  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f, object_pairs_hook=unique)
  except (OSError, json.JSONDecodeError) as e:
    raise LayoutError(f'{path} is not readable JSON ({e}); {fix}') from None
  if not isinstance(data, dict):
    raise LayoutError(f'{path}: {fix}')
  folder = os.path.dirname(path)
  out = {}
  for name, targets in data.items():
    if not isinstance(targets, dict) or not all(
        isinstance(p, str) and isinstance(m, str) for p, m in targets.items()):
      raise LayoutError(f'{path}: entry {name!r}: {fix}')
    bad = [p for p in targets if not p.strip()]
    if bad:
      raise LayoutError(f'{path}: entry {name!r} has an empty prompt; give every mask a prompt')
    out[name] = tuple((p, os.path.join(folder, m)) for p, m in targets.items())
  return out


def _folder_pairs(base: str, subdirs: tuple[str, str, str], names: list[str] | None,
                  prompts: dict[str, str],
                  targets: dict[str, tuple[tuple[str, str], ...]] | None = None) -> list[Pair]:
  da, db, dl = (os.path.join(base, s) for s in subdirs)
  if names is None:
    stems_a = {os.path.splitext(n)[0] for n in _images_in(da)}
    names = _images_in(da) + sorted(n for n in set(_images_in(db)) | set(_images_in(dl))
                                    if os.path.splitext(n)[0] not in stems_a)
    names = list(dict.fromkeys(names))
  targets = targets or {}
  return [Pair(n, _match(da, n), _match(db, n), _match(dl, n), prompts.get(n, ''),
               targets=targets.get(n, ())) for n in names]


def _require_dir(path: str, layout: str, hint: str) -> None:
  if not os.path.isdir(path):
    raise LayoutError(f'{path} does not exist: not a {layout} layout ({hint})')


def list_pairs(layout: str, root: str, split: str, num_splits: int = 1) -> list[Pair]:
  """Pairs of `split` under `root` in `layout` (sorted by name unless a list file orders them)."""
  if layout not in REGISTRY:
    raise LayoutError(f'unknown layout {layout!r}; one of {layout_names()}')
  return REGISTRY[layout].reader(root, split, num_splits)


@register_layout('segchange-default', 'ROOT/{split}/{A,B,label}, prompts.txt [targets.json]')
def _segchange_default(root: str, split: str, num_splits: int) -> list[Pair]:
  """SegChange-R1's default layout: one folder per split, prompts.txt beside A, B, label.

  Optional `ROOT/{split}/targets.json` adds per-prompt targets (`read_targets`); its masks
  live under the split folder (the synthetic generator uses `targets/<stem>/<slug>.png`).
  """
  del num_splits
  layout = 'segchange-default'
  base = os.path.join(root, split)
  _require_dir(base, layout, 'expected ROOT/{split}/{A,B,label} and ROOT/{split}/prompts.txt')
  return _folder_pairs(base, ('A', 'B', 'label'), None,
                       read_prompts(os.path.join(base, 'prompts.txt')),
                       read_targets(os.path.join(base, 'targets.json')))


@register_layout('segchange-custom',
                 'ROOT/{A,B,label}, ROOT/list/{split}.txt, ROOT/prompts.txt')
def _segchange_custom(root: str, split: str, num_splits: int) -> list[Pair]:
  """SegChange-R1's custom layout: one folder of all pairs, a list file selects each split."""
  del num_splits
  _require_dir(os.path.join(root, 'A'), 'segchange-custom',
               'expected ROOT/{A,B,label} and ROOT/list/')
  names = read_name_list(os.path.join(root, 'list', f'{split}.txt'))
  return _folder_pairs(root, ('A', 'B', 'label'), names,
                       read_prompts(os.path.join(root, 'prompts.txt')))


@register_layout('opencd', 'ROOT/{split}/{A,B,label} or a flat ROOT/{A,B,label} (LEVIR-CD, WHU)')
def _opencd(root: str, split: str, num_splits: int) -> list[Pair]:
  """open-cd style (LEVIR-CD, WHU-CD): ROOT/{split}/{A,B,label}/<name>.

  Flat root (ROOT/{A,B,label}, no split folders): ROOT/list/{split}.txt selects the split's
  names when it exists, otherwise the whole root is the one split named by --splits (more
  than one split is then an error).
  """
  subdirs = ('A', 'B', 'label')
  base = os.path.join(root, split)
  if os.path.isdir(base):
    return _folder_pairs(base, subdirs, None, {})
  if os.path.isdir(os.path.join(root, 'A')):
    list_file = os.path.join(root, 'list', f'{split}.txt')
    if os.path.isfile(list_file):
      return _folder_pairs(root, subdirs, read_name_list(list_file), {})
    if num_splits != 1:
      raise LayoutError(f'{root} has no split folders and no list/{split}.txt: a flat opencd '
                        'root is one split; pass a single --splits NAME')
    return _folder_pairs(root, subdirs, None, {})
  raise LayoutError(f'{base} does not exist: expected ROOT/{split}/{{{",".join(subdirs)}}}')


@register_layout('sysu', 'ROOT/{split}/{time1,time2,label} (SYSU-CD)')
def _sysu(root: str, split: str, num_splits: int) -> list[Pair]:
  """SYSU-CD: ROOT/{split}/{time1,time2,label}/<name>."""
  del num_splits
  subdirs = ('time1', 'time2', 'label')
  base = os.path.join(root, split)
  if os.path.isdir(base):
    return _folder_pairs(base, subdirs, None, {})
  raise LayoutError(f'{base} does not exist: expected ROOT/{split}/{{{",".join(subdirs)}}}')


@register_layout('changefine-json', 'ROOT/*_{split}.json, ChangeFine COCO style with RLE masks')
def _changefine(root: str, split: str, num_splits: int) -> list[Pair]:
  """ChangeFine COCO-style JSON (whudk/ChangeFine scripts/cd2json.py): ROOT/*_{split}.json.

  Image paths are absolute or relative to the JSON's folder. images[]: {id, width, height,
  oldpath, newpath, labelpath}; annotations[]: {image_id, category_id, segmentation: RLE of
  one label value}; categories: 'unknown' or a list of {id: pixel value, name}: category_id
  holds the name, so the value is looked up by name (255 when unknown); the RLE masks stand
  in for a missing label file.
  """
  del num_splits
  found = sorted(glob.glob(os.path.join(root, f'*_{split}.json')))
  if len(found) != 1:
    raise LayoutError(f'expected exactly one {root}/*_{split}.json for changefine-json, '
                      f'found {found or "none"}')
  path = found[0]
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  if not isinstance(data, dict) or 'images' not in data:
    raise LayoutError(f'{path} has no "images" list: not a ChangeFine COCO-style JSON')
  value_of = {}
  if isinstance(data.get('categories'), list):
    value_of = {str(c['name']): int(c['id']) for c in data['categories']}
  anns = {}
  for ann in data.get('annotations', []):
    value = value_of.get(str(ann.get('category_id')), 255)
    anns.setdefault(ann['image_id'], []).append((value, ann['segmentation']))
  folder = os.path.dirname(os.path.abspath(path))
  resolve = lambda p: p if os.path.isabs(p) else os.path.join(folder, p)
  pairs = []
  for img in data['images']:
    for key in ('oldpath', 'newpath', 'labelpath'):
      if key not in img:
        raise LayoutError(f'{path}: image id {img.get("id")} lacks "{key}"')
    rle = (int(img['height']), int(img['width']), anns.get(img['id'], []))
    pairs.append(Pair(os.path.basename(img['oldpath']), resolve(img['oldpath']),
                      resolve(img['newpath']), resolve(img['labelpath']), '', rle))
  return pairs


# SECOND (Yang et al., "Asymmetric Siamese Networks for Semantic Change Detection in Aerial
# Images"): index, name (the prompt word) and RGB colour of its label1/label2 maps, in the
# order of the SECOND authors' follow-up code (ggsDing/Bi-SRNet, datasets/RS_ST.py:
# ST_COLORMAP / ST_CLASSES, where "ground" is the paper's non-vegetated ground surface and
# "sports field" its playground). Other code bases order the classes differently; the names
# and colours agree, and SeK does not depend on the order of the change classes.
SECOND_CLASSES = (
    (0, 'no change', (255, 255, 255)),
    (1, 'water', (0, 0, 255)),
    (2, 'ground', (128, 128, 128)),
    (3, 'low vegetation', (0, 128, 0)),
    (4, 'tree', (0, 255, 0)),
    (5, 'building', (128, 0, 0)),
    (6, 'playground', (255, 0, 0)),
)
ANY_CHANGE = 'any change'


def second_prompt(src: str | None = None, dst: str | None = None) -> str:
  """Target prompt: 'low vegetation -> building', 'any change to water', 'any change from
  tree', or 'any change' (neither class given)."""
  if src and dst:
    return f'{src} -> {dst}'
  if dst:
    return f'{ANY_CHANGE} to {dst}'
  if src:
    return f'{ANY_CHANGE} from {src}'
  return ANY_CHANGE


def second_vocabulary(classes=SECOND_CLASSES) -> tuple[str, ...]:
  """Every target prompt `semantic_targets` can write, in its order (negatives come from here)."""
  names = [n for i, n, _ in classes if i]
  return ((ANY_CHANGE,) + tuple(second_prompt(a, b) for a in names for b in names)
          + tuple(second_prompt(dst=n) for n in names)
          + tuple(second_prompt(src=n) for n in names))


def colour_to_class(rgb: np.ndarray, path: str, classes=SECOND_CLASSES) -> np.ndarray:
  """[H, W, 3] uint8 colour-coded map -> [H, W] uint8 class indices of `classes`.

  A colour not in the table raises LayoutError naming the file and the colours.
  """
  code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
  table = {(r << 16) | (g << 8) | b: i for i, _, (r, g, b) in classes}
  keys = np.array(sorted(table), np.int32)
  pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
  known = keys[pos] == code
  if not known.all():
    colours, counts = np.unique(code[~known], return_counts=True)
    order = np.argsort(-counts)[:5]
    found = ', '.join(f'RGB({c >> 16}, {(c >> 8) & 255}, {c & 255}) x{n}'
                      for c, n in zip(colours[order], counts[order]))
    more = f' and {len(colours) - 5} more' if len(colours) > 5 else ''
    legend = ', '.join(f'{n} {tuple(c)}' for _, n, c in classes)
    raise LayoutError(f'{path}: {int((~known).sum())} pixel(s) with colours not in the SECOND '
                      f'class table: {found}{more}. Expected only {legend}; re-export the map '
                      'with exactly these colours (lossless PNG, no anti-aliasing or resizing)')
  values = np.array([table[k] for k in keys.tolist()], np.uint8)
  return values[pos]


def semantic_targets(from_class: np.ndarray, to_class: np.ndarray, classes=SECOND_CLASSES
                     ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
  """Two [H, W] class maps (0 = no change) -> (binary label 0/255, [(prompt, 0/255 mask)]).

  Change is where either map is not 0. Targets, in `second_vocabulary` order, only those that
  occur: 'any change' (always, = the label), 'A -> B' per (from, to) class pair, 'any change
  to B' per class changed into, 'any change from A' per class changed from. A pixel with a
  class in one map only is changed but in no directional target.
  """
  names = {i: n for i, n, _ in classes}
  changed = (from_class != 0) | (to_class != 0)
  label = changed.astype(np.uint8) * 255
  targets = [(ANY_CHANGE, label)]
  both = (from_class != 0) & (to_class != 0)
  pair_code = from_class.astype(np.int32) * 256 + to_class
  present = set(np.unique(pair_code[both]).tolist())
  order = [i for i, _, _ in classes if i]
  for a in order:
    for b in order:
      if a * 256 + b in present:
        mask = both & (pair_code == a * 256 + b)
        targets.append((second_prompt(names[a], names[b]), mask.astype(np.uint8) * 255))
  for side, cls in (('dst', to_class), ('src', from_class)):
    for c in order:
      mask = both & (cls == c)
      if mask.any():
        targets.append((second_prompt(**{side: names[c]}), mask.astype(np.uint8) * 255))
  return label, targets


@register_layout('second', 'ROOT/{split}/{im1,im2,label1,label2} (SECOND land-cover maps)')
def _second(root: str, split: str, num_splits: int) -> list[Pair]:
  """SECOND semantic change detection: ROOT/{split}/{im1,im2,label1,label2}/<name>.

  label1/label2 are RGB land-cover maps of the two dates in the colours of `SECOND_CLASSES`
  (white = no change). The converter turns them into the binary change label and the
  per-prompt targets of `semantic_targets` ('low vegetation -> building', 'any change to
  water', 'any change from tree', 'any change').
  """
  del num_splits
  base = os.path.join(root, split)
  _require_dir(base, 'second', 'expected ROOT/{split}/{im1,im2,label1,label2}')
  pairs = _folder_pairs(base, ('im1', 'im2', 'label1'), None, {})
  l2 = os.path.join(base, 'label2')
  return [dataclasses.replace(p, semantic=(p.label, _match(l2, p.name))) for p in pairs]


def _rle_counts(counts) -> np.ndarray:
  """COCO RLE counts (list or compressed string) -> run lengths."""
  if isinstance(counts, list):
    return np.asarray(counts, np.int64)
  data = counts.encode('ascii') if isinstance(counts, str) else counts
  out, p = [], 0
  while p < len(data):
    x, k, more = 0, 0, True
    while more:
      c = data[p] - 48
      x |= (c & 0x1f) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(out) > 2:
      x += out[-2]
    out.append(x)
  return np.asarray(out, np.int64)


def rle_to_label(height: int, width: int, masks: list[tuple[int, dict]]) -> np.ndarray:
  """[(value, COCO RLE)] -> uint8 [height, width] label (column-major runs, 0-runs first)."""
  label = np.zeros(height * width, np.uint8)
  for value, rle in masks:
    runs = _rle_counts(rle['counts'])
    if runs.sum() != height * width:
      raise LayoutError(f'RLE covers {runs.sum()} pixels, image is {height}x{width}')
    bits = np.repeat(np.arange(len(runs)) % 2, runs).astype(bool)
    label[bits] = value
  return label.reshape(width, height).T.copy()
