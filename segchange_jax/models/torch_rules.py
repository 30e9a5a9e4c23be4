"""Mapping PyTorch state_dict entries onto Flax variables, and back.

Every module that has weights declares its mapping as a list of `Rule`s (torch key -> Flax
variable path + layout kind). The same rules drive both directions, so import and export can
never disagree. `convert` checks every key and shape and reports all problems in one error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Layout kinds: how a torch tensor is laid out relative to the Flax variable.
#   copy   - identical layout (biases, norm scales, running stats, embeddings, tables)
#   linear - torch Linear weight [out, in]      <-> Flax Dense kernel [in, out]
#   conv   - torch Conv2d weight [O, I/g, kh, kw] <-> Flax Conv kernel [kh, kw, I/g, O]
#   conv1x1_to_dense - torch 1x1 Conv2d [O, I, 1, 1] <-> Flax Dense kernel [I, O]
#   dense_to_conv1x1 - torch Linear [O, I] <-> Flax 1x1 Conv kernel [1, 1, I, O]
KINDS = ('copy', 'linear', 'conv', 'conv1x1_to_dense', 'dense_to_conv1x1')


@dataclasses.dataclass(frozen=True)
class Rule:
  """One torch tensor <-> one Flax variable.

  Attributes:
    torch_key: full state_dict key, e.g. 'fpn.fusion_conv.weight'.
    path: Flax variable path starting with the collection, e.g.
      ('params', 'neck', 'fusion', 'kernel') or ('batch_stats', ..., 'mean').
    kind: one of KINDS.
  """
  torch_key: str
  path: tuple[str, ...]
  kind: str = 'copy'

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown rule kind {self.kind!r} for {self.torch_key}')


def to_flax(value: np.ndarray, kind: str) -> np.ndarray:
  """Torch layout -> Flax layout."""
  if kind == 'copy':
    return value
  if kind == 'linear':
    return value.T
  if kind == 'conv':
    return value.transpose(2, 3, 1, 0)
  if kind == 'conv1x1_to_dense':
    return value[:, :, 0, 0].T
  if kind == 'dense_to_conv1x1':
    return value.T[None, None]
  raise ValueError(kind)


def to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  """Flax layout -> torch layout (inverse of `to_flax`)."""
  if kind == 'copy':
    return value
  if kind == 'linear':
    return value.T
  if kind == 'conv':
    return value.transpose(3, 2, 0, 1)
  if kind == 'conv1x1_to_dense':
    return value.T[:, :, None, None]
  if kind == 'dense_to_conv1x1':
    return value[0, 0].T
  raise ValueError(kind)


# Helpers to write rules compactly --------------------------------------------------------


def linear(torch_prefix: str, path: Sequence[str], bias: bool = True) -> list[Rule]:
  """torch nn.Linear -> flax nn.Dense."""
  rules = [Rule(f'{torch_prefix}.weight', ('params', *path, 'kernel'), 'linear')]
  if bias:
    rules.append(Rule(f'{torch_prefix}.bias', ('params', *path, 'bias')))
  return rules


def conv(torch_prefix: str, path: Sequence[str], bias: bool = True) -> list[Rule]:
  """torch nn.Conv2d -> flax nn.Conv (NHWC, HWIO kernel)."""
  rules = [Rule(f'{torch_prefix}.weight', ('params', *path, 'kernel'), 'conv')]
  if bias:
    rules.append(Rule(f'{torch_prefix}.bias', ('params', *path, 'bias')))
  return rules


def norm(torch_prefix: str, path: Sequence[str]) -> list[Rule]:
  """torch LayerNorm / GroupNorm (affine) -> flax LayerNorm / GroupNorm."""
  return [Rule(f'{torch_prefix}.weight', ('params', *path, 'scale')),
          Rule(f'{torch_prefix}.bias', ('params', *path, 'bias'))]


def batchnorm(torch_prefix: str, path: Sequence[str], collection: str = 'batch_stats'
              ) -> list[Rule]:
  """torch BatchNorm2d -> flax BatchNorm (`num_batches_tracked` is ignored on load).

  With `collection='frozen'` all four tensors go to that collection (FrozenBatchNorm).
  """
  if collection == 'frozen':
    return [Rule(f'{torch_prefix}.weight', ('frozen', *path, 'scale')),
            Rule(f'{torch_prefix}.bias', ('frozen', *path, 'bias')),
            Rule(f'{torch_prefix}.running_mean', ('frozen', *path, 'mean')),
            Rule(f'{torch_prefix}.running_var', ('frozen', *path, 'var'))]
  return norm(torch_prefix, path) + [
      Rule(f'{torch_prefix}.running_mean', (collection, *path, 'mean')),
      Rule(f'{torch_prefix}.running_var', (collection, *path, 'var'))]


# Conversion ------------------------------------------------------------------------------


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """jax key path -> tuple of names ('params', 'backbone', 'conv', 'kernel')."""
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


class ConversionError(ValueError):
  """A state_dict does not fit the model; the message lists every offending key."""


def flatten(tree: Mapping[str, Any], prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Unwraps {'model': sd} / {'state_dict': sd} and DataParallel's 'module.' prefix."""
  for key in ('model', 'state_dict'):
    if key in state_dict and isinstance(state_dict[key], Mapping):
      state_dict = state_dict[key]
      break
  return {k.removeprefix('module.'): v for k, v in state_dict.items()}


def _listing(title: str, items: Sequence[str], shown: int = 12) -> str:
  """`title:` and the first `shown` items, one per line; the rest counted, not printed."""
  lines = [title + ':'] + [f'  {item}' for item in items[:shown]]
  if len(items) > shown:
    lines.append(f'  ... and {len(items) - shown} more')
  return '\n'.join(lines)


def convert(state_dict: Mapping[str, Any], rules: Iterable[Rule],
            expected: Mapping[str, Any] | None = None,
            ignore: Sequence[str] = (r'.*num_batches_tracked$',),
            aliases: Mapping[str, str] | None = None,
            source: str = 'checkpoint') -> dict[str, Any]:
  """Builds Flax variables from a torch state_dict.

  Args:
    state_dict: torch key -> array (numpy or anything `np.asarray` accepts).
    rules: the model's mapping.
    expected: Flax variables (or their `jax.eval_shape`) to check shapes against and to
      make sure every Flax variable is covered by a rule.
    ignore: regexes of torch keys that are known and deliberately unused.
    aliases: alias torch key -> canonical torch key for tensors stored twice (they must agree).
    source: the file name, for error messages.

  Returns:
    Nested dict {collection: {...}} of float32 numpy arrays.
  """
  rules = list(rules)
  by_key = {r.torch_key: r for r in rules}
  aliases = dict(aliases or {})
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  ignore_re = [re.compile(p) for p in ignore]
  expected_flat = flatten(expected) if expected is not None else None

  unknown, missing, mismatched, disagree = [], [], [], []
  flat = {}
  for key, value in sd.items():
    if key in by_key:
      continue
    if key in aliases:
      canonical = aliases[key]
      if canonical in sd and (sd[canonical].shape != value.shape
                              or not np.array_equal(sd[canonical], value)):
        disagree.append(f'{key} != {canonical}')
      continue
    if any(p.fullmatch(key) for p in ignore_re):
      continue
    unknown.append(f'{key} {tuple(value.shape)}')
  for rule in rules:
    if rule.torch_key not in sd:
      missing.append(rule.torch_key)
      continue
    value = to_flax(sd[rule.torch_key], rule.kind)
    if expected_flat is not None:
      if rule.path not in expected_flat:
        raise ValueError(f'rule for {rule.torch_key} points at {"/".join(rule.path)}, which the '
                         'Flax model does not have (a bug in the mapping)')
      want = tuple(expected_flat[rule.path].shape)
      if tuple(value.shape) != want:
        mismatched.append(f'{rule.torch_key}: checkpoint {tuple(sd[rule.torch_key].shape)}, '
                          f'model expects {tuple(to_torch(np.zeros(want), rule.kind).shape)}')
        continue
    flat[rule.path] = value.astype(np.float32) if value.dtype.kind == 'f' else value
  if expected_flat is not None:
    covered = {r.path for r in rules}
    uncovered = [p for p in expected_flat if p not in covered]
    if uncovered:
      raise ValueError('Flax variables without a torch rule (a bug in the mapping): '
                       + ', '.join('/'.join(p) for p in uncovered[:20]))
  problems = []
  if unknown:
    problems.append(_listing(f'{len(unknown)} unexpected keys (not part of this model variant)',
                             unknown))
  if missing:
    problems.append(_listing(f'{len(missing)} missing keys', missing))
  if mismatched:
    problems.append(_listing(f'{len(mismatched)} keys with the wrong shape', mismatched))
  if disagree:
    problems.append(_listing(f'{len(disagree)} aliased tensors that differ', disagree))
  if problems:
    raise ConversionError(
        f'{source} does not match this model config. Check that the config (backbone, bev, '
        'fpn_type, diff_attention, use_ega, use_token_connector, out_dims, text dim, '
        'num_classes) is the one the checkpoint was trained with.\n' + '\n'.join(problems))
  return _unflatten(flat)


def export(variables: Mapping[str, Any], rules: Iterable[Rule],
           extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Flax variables -> torch-layout state_dict (numpy), the inverse of `convert`."""
  flat = flatten(variables)
  out = {}
  for rule in rules:
    out[rule.torch_key] = np.ascontiguousarray(to_torch(np.asarray(flat[rule.path]), rule.kind))
  out.update(extra or {})
  return out
