"""The one place segchange_jax touches private JAX APIs (`jax._src`), each with its reason.

Everything else in the package uses public JAX only; ruff's banned-api rule (TID251, configured
in pyproject.toml) rejects `jax._src` imports anywhere but here. When a JAX upgrade breaks a
function below, this file is the whole blast radius.
"""

from __future__ import annotations


def wait_at_barrier(name: str, timeout_s: float) -> None:
  """Blocks until every process of a multi-process run reached barrier `name`.

  Why private: `jax.experimental.multihost_utils.sync_global_devices` is the public barrier,
  but it is a device all-reduce, so it needs compiled collectives and the devices' memory;
  before a long compilation (trainer) we want processes to meet at the coordination service
  alone, with a timeout. JAX exposes that client only as `jax._src.distributed.global_state`.
  A single-process run (no client) returns at once.
  """
  from jax._src import distributed  # noqa: TID251 pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def linear_symbolic_dim(d) -> tuple[str, int, int] | None:
  """(symbol, c0, k) when the `jax.export` symbolic dimension `d` equals c0 + k * symbol for
  one symbol, else None.

  Why private: jax.export's symbolic dimensions (`_DimExpr`) offer no public way to list their
  symbols or evaluate them at a value; the ONNX converter (inference/onnx_export.py) needs both
  to rebuild a batch-dependent shape from the input's runtime shape.
  """
  get_vars = getattr(d, '_get_vars', None)
  evaluate = getattr(d, '_evaluate', None)
  if get_vars is None or evaluate is None:
    return None
  syms = list(get_vars())
  if len(syms) != 1:
    return None
  s = syms[0]
  c0 = int(evaluate({s: 0}))
  k = int(evaluate({s: 1})) - c0
  if any(int(evaluate({s: n})) != c0 + k * n for n in (2, 7)):
    return None
  return s, c0, k
