"""Test-time augmentation (TTA): the dihedral transforms of the image plane, logits averaged.

Every symmetry of a square (the group D4) is "transpose or not, then flip rows and/or
columns"; each of the 8 is a `Transform(name, transpose, flip_rows, flip_cols)` on NHWC
batches (axes 1 and 2), with the exact inverse "flip, then transpose". Both are pure
permutations of pixels (indexing with negative strides and an axis swap: lax.rev / transpose
under jit, no arithmetic), so `inverse(forward(x))` is `x` bit for bit, on numpy and jax
arrays alike. Transposing swaps H and W, so the 4 transforms that transpose (the 90 and 270
degree rotations, transpose, anti-transpose) need square images to share one batch with the
others.

Sets by name (`SETS`; the `--tta` values of `evaluate` and `infer`):
- 'none': identity only; `tta_logits` then is the plain call (same numbers, same graph).
- 'flips': identity, horizontal flip, vertical flip and both (= 180 degree rotation); works
  on any H x W.
- 'd4': all 8 (adds the 90 / 270 degree rotations, transpose and anti-transpose); square
  images only.

`tta_logits` stacks the T transforms of a B batch into ONE call of the model (batch T * B, so
the accelerator sees one large batch instead of T small ones; memory grows by T) and averages
the T logits after mapping each back to the input frame. It relies on the model treating the
examples of a batch independently, as SegChange does at inference (BatchNorm uses its running
statistics when train=False).

Why logits, not probabilities: the averaged logits are still logits, so everything downstream
(the loss, the confusion matrix with its threshold, sigmoid / softmax in inference) runs
unchanged on them, and it is what the issue asks for. Averaging log-odds is the normalised
geometric mean of the T predictions (a product of experts): unlike a mean of probabilities it
does not saturate at 0 or 1, so each view's confidence counts in full, that of a confidently
wrong view too. For binary models both rules give the same decision when all views agree.

This module imports jax only inside `tta_logits`: the command lines import it for their flag
choices before any flag is checked, without paying for jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


class TTAError(ValueError):
  """A TTA setting that cannot be used (unknown name, rotations on non-square images)."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """x -> flip(transpose(x)) over NHWC axes 1 (rows) and 2 (columns)."""
  name: str
  transpose: bool
  flip_rows: bool
  flip_cols: bool

  def forward(self, x):
    """The transform of an [N, H, W, ...] array."""
    if self.transpose:
      x = x.swapaxes(1, 2)
    return _flip(x, self.flip_rows, self.flip_cols)

  def inverse(self, x):
    """The exact inverse: flips are their own inverses and come off first."""
    x = _flip(x, self.flip_rows, self.flip_cols)
    return x.swapaxes(1, 2) if self.transpose else x


def _flip(x, rows: bool, cols: bool):
  return x[:, ::-1 if rows else 1, ::-1 if cols else 1]


# rot90 / rot270 turn the image counterclockwise by 90 / 270 degrees, as
# numpy.rot90(x, k, axes=(1, 2)) with k = 1 / 3.
TRANSFORMS: dict[str, Transform] = {t.name: t for t in (
    Transform('identity', False, False, False),
    Transform('hflip', False, False, True),
    Transform('vflip', False, True, False),
    Transform('rot180', False, True, True),
    Transform('rot90', True, True, False),
    Transform('rot270', True, False, True),
    Transform('transpose', True, False, False),
    Transform('antitranspose', True, True, True),
)}

SETS: dict[str, tuple[str, ...]] = {
    'none': ('identity',),
    'flips': ('identity', 'hflip', 'vflip', 'rot180'),
    'd4': tuple(TRANSFORMS),
}
NAMES = tuple(SETS)


def resolve(tta: str | Sequence[str]) -> tuple[Transform, ...]:
  """A set name ('none', 'flips', 'd4') or a sequence of transform names -> the transforms."""
  names = SETS.get(tta) if isinstance(tta, str) else tuple(tta)
  if names is None:
    raise TTAError(f'tta {tta!r} is not one of {list(SETS)}')
  unknown = [n for n in names if n not in TRANSFORMS]
  if unknown or not names:
    raise TTAError(f'tta transforms {list(names)}: each must be one of {list(TRANSFORMS)}')
  return tuple(TRANSFORMS[n] for n in names)


def needs_square(tta: str | Sequence[str]) -> bool:
  """True when the set rotates or transposes, i.e. needs H == W."""
  return any(t.transpose for t in resolve(tta))


def check_shape(tta: str | Sequence[str], height: int, width: int, what: str = 'images') -> None:
  """Raises TTAError when `tta` rotates `what` of height x width that are not square."""
  if height != width and needs_square(tta):
    label = tta if isinstance(tta, str) else list(tta)
    raise TTAError(f'tta {label!r} rotates and transposes, which needs square {what}; got '
                   f'{height}x{width} (H x W): use tta \'flips\' or square {what}')


def tta_logits(logits_fn: Callable[[Any, Any, Any], Any], a, b, text,
               transforms: str | Sequence[str] = 'd4'):
  """Mean over `transforms` of logits_fn on the transformed pair, mapped back; one call.

  Args:
    logits_fn: (a [N, H, W, C], b [N, H, W, C], text [N, ...]) -> logits [N, H, W, K], each
      example independent of the others in its batch.
    a, b: NHWC image batches [B, H, W, C] (numpy or jax; inside jit too).
    text: per-example text input [B, ...] (repeated for every transform).
    transforms: a set name of `SETS` or a sequence of `TRANSFORMS` names.

  Returns:
    [B, H, W, K] averaged logits in the input frame; for the identity alone, logits_fn(a, b,
    text) itself.
  """
  ts = resolve(transforms)
  check_shape(transforms, int(a.shape[1]), int(a.shape[2]))
  if len(ts) == 1 and ts[0].name == 'identity':
    return logits_fn(a, b, text)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = a.shape[0]
  logits = logits_fn(jnp.concatenate([t.forward(a) for t in ts]),
                     jnp.concatenate([t.forward(b) for t in ts]),
                     jnp.concatenate([text] * len(ts)))
  back = [t.inverse(logits[i * n:(i + 1) * n]) for i, t in enumerate(ts)]
  return jnp.mean(jnp.stack(back), axis=0)
