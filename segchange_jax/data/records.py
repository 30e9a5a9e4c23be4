"""The record format of converted shards (one pair per record), shared by writers and readers.

A record is a serialised `tf.train.Example` (the proto TFDS bundles, so TensorFlow is never
needed) with bytes features:
  image_a, image_b: lossless PNG, 3-channel RGB uint8, same size;
  label: lossless PNG, 1 channel uint8 (raw label values; any non-zero = change for K=1);
  file_name: UTF-8 source name (tiles add `_y{Y}_x{X}` before the extension);
  prompt: UTF-8 text prompt ('' = none given).
Optional per-prompt targets (several (prompt, mask) pairs, e.g. "new buildings" and its mask):
  targets/prompt: bytes_list of UTF-8 prompts, each non-empty and distinct within the record;
  targets/mask: bytes_list of 1-channel uint8 PNGs in the same order, each the images' size
    (any non-zero = the pixel belongs to the prompt's change).
The names are how TFDS flattens a `Sequence({'prompt': Text, 'mask': Image})` feature named
`targets`, so the same feature names are what `data_prep.tfds_builder` declares: TFDS reads our
shards and we read its shards. A record without the target features (every shard written before
they existed, and every single-label dataset) decodes with `targets == []`: its one target is
then (`prompt`, `label`), as it always was.
"""

from __future__ import annotations

import struct
from typing import Sequence

import cv2
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

FEATURES = ('image_a', 'image_b', 'label', 'file_name', 'prompt')
TARGET_PROMPTS = 'targets/prompt'
TARGET_MASKS = 'targets/mask'
TARGET_FEATURES = (TARGET_PROMPTS, TARGET_MASKS)

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class RecordError(ValueError):
  """A record cannot be decoded; the message names the record."""


def encode_png(array: np.ndarray) -> bytes:
  """[H, W, 3] RGB or [H, W] uint8 -> PNG bytes (RGB order inside the PNG)."""
  if array.dtype != np.uint8:
    raise ValueError(f'encode_png expects uint8, got {array.dtype}')
  if array.ndim == 3:
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
  ok, buf = cv2.imencode('.png', array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
  if not ok:
    raise ValueError('PNG encoding failed')
  return buf.tobytes()


def decode_png(data: bytes, channels: int) -> np.ndarray:
  """PNG bytes -> uint8 [H, W, 3] RGB (channels=3) or [H, W] (channels=1)."""
  flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
  array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
  if array is None:
    raise RecordError('undecodable PNG in record')
  if channels == 3:
    array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
  return array


def png_size(data: bytes) -> tuple[int, int]:
  """(height, width) from a PNG's header without decoding it."""
  if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b'IHDR':
    raise RecordError('not a PNG (no PNG signature and IHDR header)')
  width, height = struct.unpack('>II', data[16:24])
  return int(height), int(width)


def check_targets(file_name: str, prompts: Sequence[str], size: tuple[int, int] | None = None,
                  mask_sizes: Sequence[tuple[int, int]] = ()) -> None:
  """Raises one RecordError naming `file_name` for empty or duplicate target prompts, or for
  masks (their (H, W) in `mask_sizes`) whose size differs from the images' `size`."""
  problems = []
  empty = [i for i, p in enumerate(prompts) if not p.strip()]
  if empty:
    problems.append(f'empty target prompt(s) at position(s) {empty}')
  seen, dups = set(), []
  for p in prompts:
    if p in seen and p not in dups:
      dups.append(p)
    seen.add(p)
  if dups:
    problems.append(f'duplicate target prompt(s) {dups}')
  if size is not None:
    bad = [(prompts[i] if i < len(prompts) else i, tuple(s))
           for i, s in enumerate(mask_sizes) if tuple(s) != tuple(size)]
    if bad:
      problems.append(f'target mask size(s) {bad} differ from the image size {tuple(size)}')
  if problems:
    raise RecordError(f'record {file_name!r}: ' + '; '.join(problems) + '. Give each target a '
                      'distinct non-empty prompt and a mask of the images\' size (merge the '
                      'masks of a repeated prompt into one), then re-create the shards')


def serialize(image_a: bytes, image_b: bytes, label: bytes, file_name: str, prompt: str,
              targets: Sequence[tuple[str, bytes]] | None = None) -> bytes:
  """Encoded PNGs and strings -> one serialised record.

  `targets`: optional (prompt, 1-channel mask PNG) pairs; None or empty writes no target
  features, so the record is byte-identical to a single-label one.
  """
  example = tf_example_pb2.Example()
  values = {'image_a': image_a, 'image_b': image_b, 'label': label,
            'file_name': file_name.encode('utf-8'), 'prompt': prompt.encode('utf-8')}
  for key, value in values.items():
    example.features.feature[key].bytes_list.value.append(value)
  if targets:
    prompts = [p for p, _ in targets]
    check_targets(file_name, prompts, png_size(image_a), [png_size(m) for _, m in targets])
    feature = example.features.feature
    feature[TARGET_PROMPTS].bytes_list.value.extend(p.encode('utf-8') for p in prompts)
    feature[TARGET_MASKS].bytes_list.value.extend(m for _, m in targets)
  return example.SerializeToString()


def parse(record: bytes) -> dict:
  """Serialised record -> dict of PNG bytes and decoded strings (images NOT decoded).

  'targets' is a list of (prompt, mask PNG bytes), [] for a record without targets.
  """
  example = tf_example_pb2.Example.FromString(record)
  feature = example.features.feature
  missing = [k for k in FEATURES if k not in feature]
  if missing:
    raise RecordError(f'record lacks features {missing}; re-create shards with data_prep.convert')
  out = {k: feature[k].bytes_list.value[0] for k in FEATURES}
  out['file_name'] = out['file_name'].decode('utf-8')
  out['prompt'] = out['prompt'].decode('utf-8')
  prompts = ([p.decode('utf-8') for p in feature[TARGET_PROMPTS].bytes_list.value]
             if TARGET_PROMPTS in feature else [])
  masks = list(feature[TARGET_MASKS].bytes_list.value) if TARGET_MASKS in feature else []
  if len(prompts) != len(masks):
    raise RecordError(f'record {out["file_name"]!r}: {len(prompts)} target prompts but '
                      f'{len(masks)} target masks; re-create the shards with data_prep.convert')
  check_targets(out['file_name'], prompts)
  out['targets'] = list(zip(prompts, masks))
  return out


def decode(record: bytes, targets: bool = True) -> dict:
  """Serialised record -> {'image_a','image_b': [H,W,3] uint8, 'label': [H,W] uint8, names,
  'targets': [(prompt, [H,W] uint8 mask), ...] ([] without targets)}.

  `targets=False` skips decoding the target masks (readers that train on the label alone).
  """
  raw = parse(record)
  out = {'image_a': decode_png(raw['image_a'], 3), 'image_b': decode_png(raw['image_b'], 3),
         'label': decode_png(raw['label'], 1), 'file_name': raw['file_name'],
         'prompt': raw['prompt']}
  if not targets:
    return out
  masks = [decode_png(m, 1) for _, m in raw['targets']]
  # TFDS stores masks as [H, W, 1] images; ours decode to [H, W] either way (grayscale read).
  check_targets(raw['file_name'], [p for p, _ in raw['targets']], out['image_a'].shape[:2],
                [m.shape[:2] for m in masks])
  out['targets'] = [(p, m) for (p, _), m in zip(raw['targets'], masks)]
  return out
