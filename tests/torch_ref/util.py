"""Helpers for parity tests: torch module -> Flax variables, error metric."""

from __future__ import annotations

import numpy as np
import torch

from segchange_jax.models import torch_rules as tc


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def to_flax(module: torch.nn.Module, rules, expected, aliases=None, ignore=()) -> dict:
  """Converts a torch module's state_dict with `rules`, checking against `expected` shapes."""
  return tc.convert(state_dict_numpy(module), rules, expected=expected, aliases=aliases,
                    ignore=(r'.*num_batches_tracked$', *ignore), source=type(module).__name__)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))
