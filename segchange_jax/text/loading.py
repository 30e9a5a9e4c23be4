"""Loads a text model (architecture + weights) from a Hugging Face directory or a GGUF file.

`config.json` `model_type` (or GGUF `general.architecture`) picks the architecture from
`ARCHITECTURES`. Weights stream one tensor at a time: each is mapped to its Flax path, cast to
the compute dtype and placed with `jax.device_put` on its own sharding, so a model larger than one
device's memory never has to exist unsharded anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Iterator

from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from segchange_jax.text import bert
from segchange_jax.text import layers
from segchange_jax.text import llama
from segchange_jax.text import phi


@dataclasses.dataclass(frozen=True)
class Architecture:
  config_cls: Any
  module_cls: Any
  hf_name_to_path: Callable[[str], Any]
  causal: bool


ARCHITECTURES = {
    'bert': Architecture(bert.BertConfig, bert.BertModel, bert.hf_name_to_path, False),
    'phi': Architecture(phi.PhiConfig, phi.PhiModel, phi.hf_name_to_path, True),
    'llama': Architecture(llama.LlamaConfig, llama.LlamaModel, llama.hf_name_to_path, True),
}


def architecture(model_type: str, source: str) -> Architecture:
  if model_type not in ARCHITECTURES:
    raise ValueError(f'{source}: model_type {model_type!r} is not supported; supported: '
                     f'{sorted(ARCHITECTURES)}')
  return ARCHITECTURES[model_type]


@dataclasses.dataclass
class LoadedModel:
  model_type: str
  config: Any               # the architecture's dataclass config
  hf_config: dict           # raw config.json (or GGUF-derived) dict
  module: Any               # linen module (with dtype)
  params: dict              # {'params': ...} placed on devices
  weight_files: list[pathlib.Path]


def param_shardings(abstract: Any, mesh: Mesh, axis: str = 'fsdp',
                    min_size: int = 2**18) -> Any:
  """NamedSharding per parameter: big matrices split along `axis`, the rest replicated.

  A parameter with at least `min_size` elements is split on its largest dimension that the
  axis size divides (embedding tables on vocab, kernels on their wider side); others replicate.
  """
  n = mesh.shape[axis]

  def one(x):
    spec = [None] * len(x.shape)
    if n > 1 and int(np.prod(x.shape)) >= min_size:
      for d in sorted(range(len(x.shape)), key=lambda i: -x.shape[i]):
        if x.shape[d] % n == 0:
          spec[d] = axis
          break
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map(one, abstract)


def _safetensors_tensors(model_dir: pathlib.Path) -> tuple[Iterator[tuple[str, np.ndarray]],
                                                           list[pathlib.Path]]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index = model_dir / 'model.safetensors.index.json'
  if index.is_file():
    names = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    files = [model_dir / n for n in names]
  elif (model_dir / 'model.safetensors').is_file():
    files = [model_dir / 'model.safetensors']
  elif (model_dir / 'pytorch_model.bin').is_file():
    raise ValueError(f'{model_dir}: only pytorch_model.bin found; this loader reads safetensors '
                     'only. Convert once with transformers: AutoModel.from_pretrained(dir)'
                     '.save_pretrained(dir, safe_serialization=True)')
  else:
    raise FileNotFoundError(f'{model_dir}: no model.safetensors (or sharded index) found')

  def gen():
    for f in files:
      with safe_open(str(f), framework='numpy') as sf:
        for k in sf.keys():
          yield k, sf.get_tensor(k)
  return gen(), files


def _resolve(hf_name: str, value: np.ndarray, arch: Architecture, flat_abstract: dict,
             source: str) -> tuple[tuple[str, ...], np.ndarray] | None:
  """One HF tensor -> (Flax path, array in Flax layout) or None for tensors we do not use."""
  try:
    mapped = arch.hf_name_to_path(hf_name)
  except KeyError:
    mapped = ('?',), '?'
  if mapped is None:
    return None
  path, leaf = mapped
  if leaf == 'bias':
    cands = [('bias', False)]
  else:
    cands = [('kernel', True), ('embedding', False), ('scale', False), ('weight', False)]
  for name, transpose in cands:
    full = ('params',) + tuple(path) + (name,)
    if full in flat_abstract:
      value = value.T if transpose else value
      want = tuple(flat_abstract[full].shape)
      if tuple(value.shape) != want:
        raise ValueError(f'{source}: tensor {hf_name} has shape {tuple(value.shape)}, the config '
                         f'expects {want} at {"/".join(full)}')
      return full, value
  raise ValueError(f'{source}: unexpected tensor {hf_name!r} (no matching parameter); the file '
                   'does not fit the config.json architecture')


def _place(tensors, arch, abstract, dtype, shardings, source) -> dict:
  flat_abstract = traverse_util.flatten_dict(abstract)
  flat_shard = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  out = {}
  for name, value in tensors:
    got = _resolve(name, np.asarray(value), arch, flat_abstract, source)
    if got is None:
      continue
    path, arr = got
    # Norm scales and biases are tiny: keep them float32 even in bf16 runs (as torch autocast).
    is_big = arr.ndim >= 2
    arr = arr.astype(jnp.dtype(dtype) if is_big else np.float32)
    out[path] = jax.device_put(arr, flat_shard.get(path)) if shardings is not None else \
        jnp.asarray(arr)
  missing = sorted('/'.join(p) for p in flat_abstract if p not in out)
  if missing:
    raise ValueError(f'{source}: weights missing for {len(missing)} parameters, e.g. {missing[:5]}')
  return traverse_util.unflatten_dict(out)


def load(path: str | os.PathLike, dtype: Any = 'float32', mesh: Mesh | None = None,
         axis: str = 'fsdp', min_size: int = 2**18) -> LoadedModel:
  """Reads a HF directory (config.json + safetensors) or a .gguf file.

  Args:
    path: model directory or GGUF file.
    dtype: compute dtype; matrices are stored in it too.
    mesh: optional mesh (axis types Auto); parameters are then placed with
      `param_shardings(..., axis)`.
    axis, min_size: see `param_shardings`.
  """
  path = pathlib.Path(path)
  dt = layers.resolve_dtype(dtype)
  if path.is_file() and path.suffix == '.gguf':
    from segchange_jax.text import gguf_io  # pylint: disable=g-import-not-at-top
    hf_config, tensors = gguf_io.read(path)
    files = [path]
  elif path.is_dir():
    cfg_file = path / 'config.json'
    if not cfg_file.is_file():
      raise FileNotFoundError(f'{path}: no config.json (expected a Hugging Face model directory)')
    hf_config = json.loads(cfg_file.read_text())
    architecture(hf_config.get('model_type', ''), str(cfg_file))
    tensors, files = _safetensors_tensors(path)
  else:
    raise FileNotFoundError(f'text model {str(path)!r} is neither a directory nor a .gguf file')
  model_type = hf_config.get('model_type', '')
  arch = architecture(model_type, str(path))
  cfg = arch.config_cls.from_hf(hf_config)
  module = arch.module_cls(cfg, dtype=dt)
  ids = jnp.zeros((1, 2), jnp.int32)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids > 0))
  shardings = param_shardings(abstract, mesh, axis, min_size) if mesh is not None else None
  params = _place(tensors, arch, abstract, dt, shardings, str(path))
  return LoadedModel(model_type, cfg, hf_config, module, params, files)
