"""Device mesh and sharding rules: data parallel x FSDP, from config.mesh.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both; parameters (and the
optimizer moments, which have the same shapes) with at least config.mesh.fsdp_min_size elements
are split over 'fsdp' along their largest dimension divisible by the fsdp size; everything else is
replicated. XLA inserts the all-gathers and reduce-scatters; the train step is the same at any size.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA, FSDP = 'data', 'fsdp'


def mesh_shape(config, device_count: int) -> tuple[int, int]:
  """(data, fsdp) sizes; a -1 entry takes the devices the other axis leaves."""
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if data == -1 and fsdp == -1:
    raise ValueError('config.mesh.data and config.mesh.fsdp cannot both be -1')
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if device_count % known:
      name = 'fsdp' if data == -1 else 'data'
      raise ValueError(f'config.mesh.{name}={known} does not divide the {device_count} devices; '
                       f'set config.mesh.{name} to a divisor of {device_count}')
    rest = device_count // known
    data, fsdp = (rest, fsdp) if data == -1 else (data, rest)
  if data * fsdp != device_count:
    raise ValueError(f'config.mesh.data={config.mesh.data} x config.mesh.fsdp={config.mesh.fsdp} '
                     f'= {data * fsdp} devices, but jax.device_count() = {device_count}; set one '
                     'of them to -1 or make their product equal the device count')
  return data, fsdp


def create_mesh(config, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices (or `devices`)."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(config, len(devices))
  return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP))


def _spec_for(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], -i))
  spec = [None] * len(shape)
  spec[axis] = FSDP
  return P(*spec)


def param_shardings(params_shapes: Any, mesh: Mesh, config) -> Any:
  """NamedSharding pytree for any pytree of arrays / ShapeDtypeStructs (params, opt state...)."""
  fsdp_size = mesh.shape[FSDP]
  min_size = config.mesh.fsdp_min_size

  def rule(x):
    shape = tuple(getattr(x, 'shape', ()))
    return NamedSharding(mesh, _spec_for(shape, fsdp_size, min_size))

  return jax.tree.map(rule, params_shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device: ('data', 'fsdp')."""
  return NamedSharding(mesh, P((DATA, FSDP)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
