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
  symbols or evaluate them at a value; the ONNX converter (inference/jaxpr_onnx.py, handed this
  function by inference/onnx_export.py) needs both to rebuild a batch-dependent shape from the
  input's runtime shape.
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


def unroll_cpu_threefry() -> bool:
  """Lowers JAX's threefry PRNG on CPU unrolled, as on every other backend: the same bits.

  Why private: JAX lowers `threefry2x32` on CPU as a rolled loop (5 x 4 rounds; smaller
  programs, faster compiles), which XLA:CPU runs as a while loop that writes both 32-bit words
  of every element to memory on each iteration. The train step's dropout masks are large (the
  Transformer BEV's attention weights at 256 px: 268 M elements per layer), so that memory
  traffic dominated drawing them. Unrolled, XLA fuses the 20 rounds into one loop that keeps
  the words in registers. The rule is JAX's own non-CPU lowering; re-registering it changes
  how the bits are computed, not which bits. It is process-wide and makes big programs slower
  to compile (each draw site is ~100 ops), so the train step applies it without remat only.
  Returns False (and changes nothing) when this JAX no longer has the pieces.
  """
  try:
    from jax._src.interpreters import mlir  # noqa: TID251 pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32  # noqa: TID251 pylint: disable=g-import-not-at-top
    rule = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    prim = threefry2x32.threefry2x32_p
  except (ImportError, AttributeError):
    return False
  mlir.register_lowering(prim, rule, platform='cpu')
  return True
