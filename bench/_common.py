"""Helpers shared by the benchmarks (run as `python bench/<name>.py` from the repository root)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


VARIANTS = ('swin_base_patch4_window7_224', 'resnet50', 'hgnetv2', 'demo')


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (sizes, batches, iteration counts)."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a positive integer')
  return value


def image_size(text: str) -> int:
  """argparse type: an image side in pixels, a positive multiple of 32 (the backbone stride)."""
  from segchange_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.check_stride(positive_int(text), repr(text), argparse.ArgumentTypeError,
                                 '{name} is not a multiple of {stride} (the backbone stride)')


def timed(step, iters: int) -> list[float]:
  """Wall seconds of each of `iters` calls of step() (which must block until its work is done)."""
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def xla_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled function as one dict ('flops', 'bytes accessed', ...).

  Older jaxlibs return a one-element list, some backends None.
  """
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost) or {}


def rss_mb() -> float:
  """Peak resident set size of this process so far, in MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def variant_config(variant: str):
  """Upstream variants (shared/upstream/README.md: v1 Swin default, v2 ResNet, v3 HGNet) or demo."""
  if variant == 'demo':  # the tiny CPU demo model (configs/demo.py), text dim 384
    from configs import demo  # pylint: disable=g-import-not-at-top
    return demo.get_config()
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  m = c.model
  m.backbone = variant
  if variant == 'resnet50':
    m.bev, m.fpn_type, m.diff_attention, m.use_ega = 'Transformer', 'FPN', 'SE', False
    c.text.dim = 2048
  elif variant == 'hgnetv2':
    m.fpn_type, m.diff_attention, m.use_ega, m.use_token_connector = 'FPN', 'SE', False, True
  return c


def random_model(variant: str, dtype: str, conditioning: str = 'none'):
  """(config, model, variables, rng) for a forward benchmark: the variant's model in `dtype`
  (and config.model.prompt_conditioning) with N(0, 0.02) weights from numpy's seed-0
  generator, which is returned for the inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from segchange_jax.models import segchange  # pylint: disable=g-import-not-at-top
  config = variant_config(variant)
  config.model.dtype = dtype
  config.model.prompt_conditioning = conditioning
  model = segchange.build_model(config)
  shapes = segchange.variable_shapes(model, 64)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), shapes)
  return config, model, variables, rng


def run_child(script: str, args: list[str], env: dict | None = None,
              timeout: float | None = None) -> tuple[dict | None, str]:
  """Runs `python script args` in a fresh process; (its RESULT json or None, stderr tail).

  With `timeout` (seconds) a child still running then is killed: (None, 'timed out ...').
  """
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, 'PYTHONPATH': REPO, **(env or {})})
  except subprocess.TimeoutExpired as e:
    tail = e.stderr[-3000:] if isinstance(e.stderr, str) else (e.stderr or b'')[-3000:].decode(
        errors='replace')
    return None, f'{tail}\n(timed out after {timeout:.0f} s)'
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not line:
    why = proc.stderr[-3000:]
    if proc.returncode < 0:  # killed by a signal
      sig = signal.Signals(-proc.returncode).name
      why += f'\n(killed by {sig}' + (': without a traceback, usually the kernel\'s out-of-memory '
                                      'killer; see `dmesg`)' if sig == 'SIGKILL' else ')')
    return None, why
  return json.loads(line[0][len('RESULT '):]), ''
