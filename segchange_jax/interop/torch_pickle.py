"""Reads PyTorch `.pth` files into numpy WITHOUT torch (and without running pickled code).

Supports the zip format (torch >= 1.6: `<root>/data.pkl` + `<root>/data/<key>` storages) and the
legacy format (`_use_new_zipfile_serialization=False`). A restricted unpickler rebuilds tensors
(`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`) as numpy arrays, OrderedDicts as
dicts; any other class in the file (an argparse Namespace, a config object, ...) becomes an inert
`Opaque` record: nothing from the file is ever executed.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from typing import Any
import zipfile

import numpy as np

try:  # bfloat16 storages (ml_dtypes ships with jax)
  import ml_dtypes
  _BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
  _BF16 = None

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': _BF16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class Opaque:
  """Stand-in for a pickled object of a class we do not import."""

  def __init__(self, name: str, args=(), state=None):
    self.name, self.args, self.state = name, args, state

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f'Opaque({self.name})'


def _opaque_class(name: str):
  class _Stub(Opaque):
    def __init__(self, *args, **kwargs):
      super().__init__(name, args, kwargs or None)

    def __new__(cls, *args, **kwargs):  # also used by copyreg's __reduce_ex__ path
      del args, kwargs
      return object.__new__(cls)
  _Stub.__name__ = _Stub.__qualname__ = name.rsplit('.', 1)[-1]
  return _Stub


class _StorageType:
  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES or _STORAGE_DTYPES[name] is None:
      raise pickle.UnpicklingError(f'unsupported torch storage type {name}')
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused, copy=True):
  """torch._utils._rebuild_tensor_v2 as a numpy copy (a view while storages are pending)."""
  del unused
  flat = storage
  size, stride = tuple(size), tuple(stride)
  item = flat.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view) if copy else view


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


def _codecs_encode(text, encoding='utf-8'):
  """Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')."""
  if encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8', 'ascii'):
    raise pickle.UnpicklingError(f'refusing codec {encoding!r}')
  return text.encode(encoding)


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('_codecs', 'encode'): _codecs_encode,
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice, ('builtins', 'complex'): complex,
    ('__builtin__', 'set'): set,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, load_storage, copy=True):
    super().__init__(file, encoding='latin1')
    self._load_storage = load_storage
    self._copy = copy

  def find_class(self, module, name):
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return lambda *a: _rebuild_tensor(*a, copy=self._copy)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name.endswith('Storage'):
      return _StorageType(name)
    if module == 'torch' and name in ('device', 'Size', 'dtype'):
      return _opaque_class(f'torch.{name}')
    if module == 'numpy' and name == 'dtype':
      return np.dtype
    if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name == 'scalar':
      return lambda dtype, data: np.frombuffer(data, dtype)[0]
    if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name == '_reconstruct':
      return lambda cls, shape, dtype: np.ndarray.__new__(np.ndarray, shape, dtype)
    if module == 'numpy' and name == 'ndarray':
      return np.ndarray
    return _opaque_class(f'{module}.{name}')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    storage_type, key, _, numel = pid[1], str(pid[2]), pid[3], pid[4]
    dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else np.dtype(np.uint8)
    return self._load_storage(key, dtype, numel)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('data.pkl')]
    if len(pkl) != 1:
      raise ValueError(f'{path}: not a torch zip checkpoint (no single data.pkl)')
    root = pkl[0][:-len('data.pkl')]
    order = '<'
    if f'{root}byteorder' in names and zf.read(f'{root}byteorder').strip() == b'big':
      order = '>'
    cache = {}

    def load_storage(key, dtype, numel):
      if key not in cache:
        raw = zf.read(f'{root}data/{key}')
        cache[key] = np.frombuffer(raw, dtype.newbyteorder(order)).astype(dtype, copy=False)
      return cache[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy header pickles (numbers, dicts, lists): no class may be loaded at all."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f'unexpected {module}.{name} in a torch file header')


def _plain_load(buf):
  return _PlainUnpickler(buf).load()


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    data = f.read()
  buf = io.BytesIO(data)
  try:
    magic = _plain_load(buf)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: neither a torch zip checkpoint nor a legacy torch file') from e
  if magic != _LEGACY_MAGIC:
    raise ValueError(f'{path}: neither a torch zip checkpoint nor a legacy torch file')
  _plain_load(buf)  # protocol version
  sys_info = _plain_load(buf)
  little = sys_info.get('little_endian', True) if isinstance(sys_info, dict) else True
  pending: dict[str, tuple[np.dtype, int]] = {}
  storages: dict[str, np.ndarray] = {}

  def load_storage(key, dtype, numel):
    # Storages follow the main pickle; fill the arrays in place once they are read.
    if key not in storages:
      storages[key] = np.empty(numel, dtype)
      pending[key] = (dtype, numel)
    return storages[key]

  result = _Unpickler(buf, load_storage, copy=False).load()
  keys = _plain_load(buf)
  order = '<' if little else '>'
  for key in keys:
    (count,) = struct.unpack('<q', buf.read(8))
    dtype = pending[key][0] if key in pending else np.dtype(np.uint8)
    raw = buf.read(count * dtype.itemsize)
    if key in storages:
      storages[key][:] = np.frombuffer(raw, dtype.newbyteorder(order))
  # Tensors are views of storages that were filled after the main pickle: copy them now.
  return _materialize(result)


def _materialize(obj):
  if isinstance(obj, np.ndarray):
    return np.array(obj)
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def load(path: str | os.PathLike) -> Any:
  """Loads a `.pth`/`.pt` file; tensors come back as numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'torch checkpoint {path!r} does not exist')
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)
