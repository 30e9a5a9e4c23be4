"""The record format of converted shards (one pair per record), shared by writers and readers.

A record is a serialised `tf.train.Example` (the proto TFDS bundles, so TensorFlow is never
needed) with bytes features:
  image_a, image_b: lossless PNG, 3-channel RGB uint8, same size;
  label: lossless PNG, 1 channel uint8 (raw label values; any non-zero = change for K=1);
  file_name: UTF-8 source name (tiles add `_y{Y}_x{X}` before the extension);
  prompt: UTF-8 text prompt ('' = none given).
The same feature names are what `data_prep.tfds_builder` declares, so TFDS reads our shards
and we read its shards.
"""

from __future__ import annotations

import cv2
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

FEATURES = ('image_a', 'image_b', 'label', 'file_name', 'prompt')


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


def serialize(image_a: bytes, image_b: bytes, label: bytes, file_name: str, prompt: str) -> bytes:
  """Encoded PNGs and strings -> one serialised record."""
  example = tf_example_pb2.Example()
  values = {'image_a': image_a, 'image_b': image_b, 'label': label,
            'file_name': file_name.encode('utf-8'), 'prompt': prompt.encode('utf-8')}
  for key, value in values.items():
    example.features.feature[key].bytes_list.value.append(value)
  return example.SerializeToString()


def parse(record: bytes) -> dict[str, bytes | str]:
  """Serialised record -> dict of PNG bytes and decoded strings (images NOT decoded)."""
  example = tf_example_pb2.Example.FromString(record)
  feature = example.features.feature
  missing = [k for k in FEATURES if k not in feature]
  if missing:
    raise RecordError(f'record lacks features {missing}; re-create shards with data_prep.convert')
  out = {k: feature[k].bytes_list.value[0] for k in FEATURES}
  out['file_name'] = out['file_name'].decode('utf-8')
  out['prompt'] = out['prompt'].decode('utf-8')
  return out


def decode(record: bytes) -> dict[str, np.ndarray | str]:
  """Serialised record -> {'image_a','image_b': [H,W,3] uint8, 'label': [H,W] uint8, names}."""
  raw = parse(record)
  return {'image_a': decode_png(raw['image_a'], 3), 'image_b': decode_png(raw['image_b'], 3),
          'label': decode_png(raw['label'], 1), 'file_name': raw['file_name'],
          'prompt': raw['prompt']}
