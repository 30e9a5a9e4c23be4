"""Converting a raw change-detection layout into ArrayRecord shards plus dataset_info.json.

The library behind `python -m data_prep.convert` (its docstring has the details).
Writes `<split>-XXXXX-of-YYYYY.array_record` (records: `segchange_jax.data.records`) and, last,
`dataset_info.json` (counts, skipped pairs with reasons, image sizes, label statistics,
prompts, optional prompt-embedding table, split leaks). Layouts: `segchange_jax.data.layouts`.
Per-prompt targets of a pair (`layouts.Pair.targets`, or derived from SECOND's two land-cover
maps) go into its records (each tile gets the tile's window of every mask, empty or not);
dataset_info.json lists their prompts under "target_prompts" (top level: all, sorted; per
split: {prompt: records}) and the --text_model table embeds them after "prompts". A dataset
without targets converts to the same shards as before they existed.
Bad input is never skipped silently: strict splits fail with one error listing every bad
pair; non-strict ones skip, print and record them. Shards are written under a temporary
folder and moved into the output only when every split succeeded (dataset_info.json last, so
a folder without it is never taken for a dataset); a failed run leaves an existing dataset as
it was and removes an output folder it created.

Split leaks (`segchange_jax.data.leaks`): every source pair is hashed while it is decoded; the
evaluation splits are converted first, so each 'train' pair is checked against them while it
streams and `on_leak='drop_from_train'` can leave it out of the train shards. Leaks between
two evaluation splits are found after both. `on_leak='error'` fails with nothing written,
'warn' writes everything; all modes list the pairs in dataset_info.json under "leaks".
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from typing import Iterable, Sequence

import numpy as np

from segchange_jax.data import layouts
from segchange_jax.data import leaks as leaks_lib
from segchange_jax.data import reading
from segchange_jax.data import records

CONVERTER_VERSION = 1
INFO_FILE = 'dataset_info.json'
EMBEDDINGS_FILE = 'prompt_embeddings.npz'
_TMP = '.convert-tmp'
TRAIN = 'train'  # the split that on_leak='drop_from_train' drops from
_DROPPED = 'split leak, dropped: '  # reason of a train pair dropped as a copy


class ConvertError(RuntimeError):
  """The conversion cannot proceed; the message lists every offending file."""


@dataclasses.dataclass
class PairResult:
  name: str
  records: list[bytes]
  problem: str = ''
  size: tuple[int, int] | None = None       # (H, W) of each record
  changed: int = 0                          # non-zero label pixels
  pixels: int = 0
  values: tuple[int, ...] = ()
  hashes: leaks_lib.PairHashes | None = None  # of the source pair, before tiling
  target_prompts: tuple[str, ...] = ()      # of every record of the pair


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
  """Window starts covering [0, length): regular stride, the last one clamped to the edge."""
  if length <= tile:
    return [0]
  starts = list(range(0, length - tile + 1, stride))
  if starts[-1] + tile < length:
    starts.append(length - tile)
  return starts


def _label_for(pair: layouts.Pair) -> np.ndarray:
  if pair.rle is not None and not os.path.isfile(pair.label):
    # ChangeFine JSON: the RLE annotations stand in for a missing label file.
    return layouts.rle_to_label(*pair.rle)
  return reading.read_label(pair.label)


def _semantic(pair: layouts.Pair) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
  """SECOND pair: its two colour-coded maps -> (binary label, targets)."""
  maps = []
  for path, what in zip(pair.semantic, ('label1', 'label2')):
    maps.append(layouts.colour_to_class(reading.read_rgb(path, f'{what} land-cover map'), path))
  if maps[0].shape != maps[1].shape:
    raise reading.PairError(f'label1/label2 size mismatch {maps[0].shape} vs {maps[1].shape}: '
                            f'{pair.semantic[1]}')
  return layouts.semantic_targets(*maps)


def _label_and_targets(pair: layouts.Pair
                       ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]], list[str]]:
  """The pair's label, its (prompt, mask) targets and the file each target came from."""
  if pair.semantic is not None:
    label, targets = _semantic(pair)
    return label, targets, [pair.semantic[0]] * len(targets)
  label = _label_for(pair)
  targets = []
  for prompt, path in pair.targets:
    try:
      targets.append((prompt, reading.read_label(path)))
    except reading.PairError as e:
      raise reading.PairError(f'target mask {prompt!r}: {e}') from None
  return label, targets, [path for _, path in pair.targets]


def convert_pair(pair: layouts.Pair, tile: int, stride: int) -> PairResult:
  """Reads, checks and (optionally) tiles one pair; a problem is returned, not raised."""
  try:
    a = reading.read_rgb(pair.a, 'A image')
    b = reading.read_rgb(pair.b, 'B image')
    label, targets, sources = _label_and_targets(pair)
    if a.shape != b.shape:
      raise reading.PairError(f'A/B size mismatch {a.shape[:2]} vs {b.shape[:2]}: {pair.b}')
    if label.shape != a.shape[:2]:
      raise reading.PairError(f'label size {label.shape} differs from image size '
                              f'{a.shape[:2]}: {pair.label}')
    for (prompt, mask), path in zip(targets, sources):
      if mask.shape != a.shape[:2]:
        raise reading.PairError(f'target mask {prompt!r} size {mask.shape} differs from image '
                                f'size {a.shape[:2]}: {path}')
    records.check_targets(pair.name, [p for p, _ in targets])
  except (reading.PairError, layouts.LayoutError, records.RecordError) as e:
    return PairResult(pair.name, [], problem=str(e))
  h, w = label.shape
  th, tw = (min(tile, h), min(tile, w)) if tile > 0 else (h, w)
  stem, ext = os.path.splitext(pair.name)
  out = []
  for y in tile_starts(h, th, stride or th):
    for x in tile_starts(w, tw, stride or tw):
      name = pair.name if (th, tw) == (h, w) else f'{stem}_y{y}_x{x}{ext}'
      win = np.s_[y:y + th, x:x + tw]
      png = lambda x: records.encode_png(np.ascontiguousarray(x[win]))  # noqa: E731
      out.append(records.serialize(png(a), png(b), png(label), name, pair.prompt,
                                   [(prompt, png(mask)) for prompt, mask in targets]))
  return PairResult(pair.name, out, size=(th, tw), changed=int(np.count_nonzero(label)),
                    pixels=label.size, values=tuple(int(v) for v in np.unique(label)),
                    hashes=leaks_lib.pair_hashes(a, b, label),
                    target_prompts=tuple(p for p, _ in targets))


def _convert_star(args) -> PairResult:
  return convert_pair(*args)


def _results(pairs: list[layouts.Pair], tile: int, stride: int, workers: int,
             desc: str) -> Iterable[PairResult]:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  jobs = [(p, tile, stride) for p in pairs]
  bar = dict(total=len(jobs), desc=desc, unit='pair', mininterval=1.0, leave=False)
  if workers <= 1 or len(jobs) < 2:
    yield from tqdm(map(_convert_star, jobs), **bar)
    return
  # spawn: the parent may already run JAX/threads, which fork would copy half-initialised.
  with multiprocessing.get_context('spawn').Pool(min(workers, len(jobs))) as pool:
    yield from tqdm(pool.imap(_convert_star, jobs, chunksize=4), **bar)


def _check_out_dir(out: str, overwrite: bool) -> bool:
  """Refuses a non-empty `out` without `overwrite`; makes the temporary folder. Returns
  whether `out` was created here (removed again if the conversion fails)."""
  created = not os.path.isdir(out)
  if not created:
    entries = [e for e in os.listdir(out) if e != _TMP]
    if entries and not overwrite:
      raise ConvertError(f'output folder {out} is not empty ({sorted(entries)[:5]}...); '
                         'pass --overwrite to replace its dataset or choose another --out')
  shutil.rmtree(os.path.join(out, _TMP), ignore_errors=True)
  os.makedirs(os.path.join(out, _TMP))
  return created


def _commit(out: str, tmp: str, info: dict) -> None:
  """Replaces the dataset in `out` by the one in `tmp`, dataset_info.json removed first and
  written last (a folder without it is not a dataset: `segchange_jax.data.shards`)."""
  old = [e for e in os.listdir(out) if e != _TMP and
         (e.endswith('.array_record') or e in (INFO_FILE, EMBEDDINGS_FILE))]
  for e in sorted(old, key=lambda e: e != INFO_FILE):
    os.remove(os.path.join(out, e))
  for name in os.listdir(tmp):
    os.replace(os.path.join(tmp, name), os.path.join(out, name))
  with open(os.path.join(tmp, INFO_FILE), 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=1)
  os.replace(os.path.join(tmp, INFO_FILE), os.path.join(out, INFO_FILE))


def _convert_split(pairs: list[layouts.Pair], split: str, tmp: str, strict: bool, tile: int,
                   stride: int, num_shards: int, workers: int, table: leaks_lib.HashTable,
                   refs: Sequence[leaks_lib.HashTable] = (),
                   drop_leaks: bool = False) -> tuple[dict, list[leaks_lib.Leak], list[str]]:
  """Converts one split into shards under `tmp`, hashing its pairs into `table`; returns its
  dataset_info entry, its leaks into the splits of `refs` (checked while streaming) and the
  names of the pairs dropped for them (with `drop_leaks` a leaking pair is not written and is
  listed as skipped)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  shards = num_shards or max(1, min(len(pairs) // 512 + 1, 64))
  names = [f'{split}-{i:05d}-of-{shards:05d}.array_record' for i in range(shards)]
  writers = [array_record_module.ArrayRecordWriter(os.path.join(tmp, n), 'group_size:1')
             for n in names]
  skipped, dropped, found, sizes, values, prompts = [], [], [], set(), set(), {}
  target_counts: dict[str, int] = {}
  count = changed = pixels = 0
  prompt_of = {p.name: p.prompt for p in pairs}
  try:
    for result in _results(pairs, tile, stride, workers, split):
      if result.problem:
        skipped.append({'file_name': result.name, 'reason': result.problem})
        continue
      if refs:
        one = leaks_lib.HashTable(split)
        one.add(result.name, result.hashes)
        pair_leaks = [lk for ref in refs for lk in leaks_lib.match(one, ref)]
        found += pair_leaks
        if pair_leaks and drop_leaks:
          dropped.append({'file_name': result.name,
                          'reason': _DROPPED + ', '.join(lk.other() for lk in pair_leaks)})
          continue
      table.add(result.name, result.hashes)
      for rec in result.records:
        writers[count % shards].write(rec)
        count += 1
      sizes.add(result.size)
      values.update(result.values)
      changed += result.changed
      pixels += result.pixels
      prompts[prompt_of[result.name]] = None
      for prompt in result.target_prompts:
        target_counts[prompt] = target_counts.get(prompt, 0) + len(result.records)
  finally:
    for w in writers:
      w.close()
  problems = [f"  {s['file_name']}: {s['reason']}" for s in skipped]
  if not pairs or count == 0:
    problems.append(f'  split {split!r} is empty (no convertible pairs found)')
  if problems and strict:
    raise ConvertError(f'split {split!r}: {len(problems)} problem(s) (strict mode; pass '
                       '--nostrict to skip and record them):\n' + '\n'.join(problems))
  for line in problems:
    print(f'WARNING skipped in {split}:{line.strip()}')
  sizes = sorted(sizes)
  skipped += dropped
  return {'num_examples': count, 'num_pairs': len(pairs) - len(skipped),
          'num_skipped': len(skipped), 'skipped': skipped, 'num_dropped_leaks': len(dropped),
          'shards': names if count else [],
          'image_size': list(sizes[0]) if len(sizes) == 1 else None,
          'image_sizes': [list(s) for s in sizes],
          'label_values': sorted(values),
          'changed_fraction': changed / pixels if pixels else 0.0,
          'prompts': sorted(prompts),
          'target_prompts': dict(sorted(target_counts.items()))
          }, found, [d['file_name'] for d in dropped]


def _embed(text_model: str, prompts: list[str], path: str) -> None:
  """Writes the prompt-embedding table (embed_prompts .npz format) with the default text
  settings and encoder `text_model`."""
  from segchange_jax import default_config  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import cache  # pylint: disable=g-import-not-at-top
  from segchange_jax.text import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  text_cfg = default_config.get_config().text
  text_cfg.model, text_cfg.embeddings = text_model, ''
  enc = cache.get_encoder(text_cfg)
  text_cfg.dim = enc.dim  # the table takes the encoder's width; training checks it fits
  table = cache.embed_prompts(text_cfg, prompts, encoder=enc)
  prompts_lib.write_npz(path, prompts, table, enc.identity, text_model)


def convert(layout: str, root: str, out: str, splits: Sequence[str] = ('train', 'val', 'test'),
            list_file: str = '', tile: int = 0, tile_stride: int = 0, text_model: str = '',
            num_shards: int = 0, strict: bool | None = None, overwrite: bool = False,
            workers: int = 1, on_leak: str = 'warn') -> dict:
  """Converts `splits` of `root`; returns the dataset_info dict also written to `out`.

  strict=None means strict for every split except 'train'. `list_file` selects names of the
  one split given (few-shot lists); it needs exactly one split. `on_leak` ('error', 'warn' or
  'drop_from_train') says what to do with pairs duplicated across splits
  (`segchange_jax.data.leaks`); 'drop_from_train' leaves the 'train' copies out, and leaks
  between two evaluation splits are only listed.
  """
  if layout not in layouts.REGISTRY:
    raise ConvertError(f'--layout {layout!r} is not one of {layouts.layout_names()}')
  if not os.path.isdir(root):
    raise ConvertError(f'--root {root} is not a folder')
  if list_file and len(splits) != 1:
    raise ConvertError('--list selects names of one split: pass exactly one --splits NAME')
  if tile < 0 or tile_stride < 0 or (tile and tile_stride > tile):
    raise ConvertError(f'--tile {tile} / --tile_stride {tile_stride}: need 0 <= stride <= tile')
  try:
    leaks_lib.check_mode(on_leak)
  except ValueError as e:
    raise ConvertError(str(e)) from None
  splits = list(dict.fromkeys(splits))
  created = _check_out_dir(out, overwrite)
  tmp = os.path.join(out, _TMP)
  info = {'converter_version': CONVERTER_VERSION, 'source_layout': layout,
          'source_root': os.path.abspath(root), 'list_file': list_file,
          'tile': tile, 'tile_stride': tile_stride or tile, 'record_format': records.__name__,
          'created': time.strftime('%Y-%m-%dT%H:%M:%S'), 'splits': {}}
  # Evaluation splits first: train pairs are then checked against them while they stream.
  evals = [s for s in splits if s != TRAIN]
  tables = {s: leaks_lib.HashTable(s) for s in splits}
  done = False
  try:
    entries, train_leaks, dropped = {}, [], []
    for split in evals + [s for s in splits if s == TRAIN]:
      pairs = layouts.list_pairs(layout, root, split, num_splits=len(splits))
      if list_file:
        by_name = {p.name: p for p in pairs}
        wanted = layouts.read_name_list(list_file)
        pairs = [by_name.get(n) or layouts.Pair(n, os.path.join(root, '<not in split>', n),
                                                '', '') for n in wanted]
      is_strict = strict if strict is not None else split != TRAIN
      refs = [tables[s] for s in evals] if split == TRAIN else ()
      entries[split], found, split_dropped = _convert_split(
          pairs, split, tmp, is_strict, tile, tile_stride, num_shards, workers, tables[split],
          refs, drop_leaks=on_leak == 'drop_from_train')
      train_leaks += found
      dropped += split_dropped
    info['splits'] = {s: entries[s] for s in splits}
    found = train_leaks + leaks_lib.find_leaks([tables[s] for s in evals])
    if found and on_leak == 'error':
      raise ConvertError(f'split leaks (--on_leak=error, nothing written): '
                         f'{leaks_lib.summary(found)}; pass --on_leak=warn to convert and '
                         'list them or --on_leak=drop_from_train to leave the train copies out')
    info['leaks'] = leaks_lib.report(found, on_leak, [tables[s] for s in splits], dropped)
    if found:
      action = (f'{len(dropped)} train pair(s) dropped' if on_leak == 'drop_from_train' else
                'all written')
      print(f'WARNING split leaks, {action}: {leaks_lib.summary(found)} '
            f'(all listed in {os.path.join(out, INFO_FILE)} under "leaks")')
    prompts = sorted({p for s in info['splits'].values() for p in s['prompts']})
    info['prompts'] = prompts
    info['target_prompts'] = sorted({p for s in info['splits'].values()
                                     for p in s['target_prompts']})
    info['prompt_embeddings'] = ''
    if text_model:
      extra = [p for p in info['target_prompts'] if p not in set(prompts)]
      _embed(text_model, prompts + extra, os.path.join(tmp, EMBEDDINGS_FILE))
      info['prompt_embeddings'] = EMBEDDINGS_FILE
    _commit(out, tmp, info)
    done = True
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if created and not done and not os.listdir(out):
      os.rmdir(out)
  return info
