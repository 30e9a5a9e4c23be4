"""Split leaks: pairs of one split that duplicate a pair of another split (train vs val/test).

`segchange_jax.data.convert` hashes every SOURCE pair (before tiling) while it decodes it and
keeps only the hashes, so finding leaks needs no second pass over the images:
- exact: SHA-256 of the decoded pixels of A, B and label (with their shapes). Pixels, not
  file bytes, so a pair re-saved losslessly (another PNG compression level, PNG <-> TIFF,
  different metadata) is still an exact copy; the pixels are in memory anyway.
- near: 64-bit DCT perceptual hashes (pHash) of A and of B: the image averaged down to 32 x 32
  (area averaging), its luma (0.299 R + 0.587 G + 0.114 B), the luma's 2-D DCT, the 63 lowest
  frequencies (the 8 x 8 corner without the DC term) compared with their median; bit 63 is
  always 0. Dropping DC and comparing with the median makes it blind to brightness gain and
  offset; the low frequencies survive JPEG re-encoding; a shift of d pixels turns the phase of
  frequency k by ~pi*k*d/size, so small shifts and crops flip few bits. Two pairs are near
  duplicates when the Hamming distances of their A hashes AND of their B hashes are both
  <= `NEAR_THRESHOLD`, and, where all four images have colour (R - B thumbnail standard
  deviation >= `MIN_COLOUR`), the same pHash of R - B is within `COLOUR_THRESHOLD` too. Luma
  alone lets two unrelated scenes with the same coarse layout (a bright object at the same
  place) match; their colours rarely agree as well. A grey copy of a colour pair has no colour
  and is matched on luma. A nearly constant image (thumbnail standard deviation < `MIN_TEXTURE`
  grey levels) has no usable pHash (its bits would be rounding noise); its pair is matched
  exactly only.

The thresholds were calibrated on `segchange_jax.data.synthetic` scenes (the generator of the
fixture of tests/data/test_leaks.py, which checks these figures at 128 px). Luma distances
(the larger of A's and B's) of a copy to its original reach: JPEG quality 75: 6; brightness
+25 % (clipped): 8; a 4 px shift along one axis (edge-padded back to size) or a 4 px crop
resized back: 16 at 128 px (99.8 % and 99.7 % of 600 such copies within both thresholds), 10
at 256 px; colour distances stay within 16 likewise. Unrelated scenes are mostly >= 22 apart
(mean ~33: random bits), a few in 100,000 pairs down to 10-14; with the colour check one pair
among the 499,500 of 1000 scenes at 128 px is near (one scene of it too grey for the colour
check), none among 79,800 pairs at 64 or at 256 px. Limits: a 4 px shift along both axes is
found at 256 px and mostly (~19 in 20) at 128 px; at 64 px a 4 px shift (6 % of the side)
moves the hash about as far as an unrelated image.

Matching is vectorised: the hashes of a split are uint64 arrays, distances are
`np.bitwise_count(x ^ y)` over blocks of query x reference pairs, exact digests are joined
through a dict. Pairs within one split are not leaks (only exact copies within a split are
counted, which is free).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Sequence

import cv2
import numpy as np

NEAR_THRESHOLD = 16
COLOUR_THRESHOLD = 16
MIN_TEXTURE = 1.0
MIN_COLOUR = 4.0
MODES = ('error', 'warn', 'drop_from_train')
_BLOCK = 1 << 22  # query x reference distances computed at once (uint8: 4 MiB)


@dataclasses.dataclass(frozen=True)
class PairHashes:
  """The hashes of one source pair (what the converter keeps of it)."""
  digest: bytes     # SHA-256 of the decoded A, B and label pixels
  a: int            # luma pHash of A (64 bits)
  b: int            # luma pHash of B
  textured: bool    # A and B both have a usable luma pHash
  ca: int = 0       # colour (R - B) pHash of A
  cb: int = 0       # colour pHash of B
  coloured: bool = False  # A and B both have colour structure enough for their colour pHash


@dataclasses.dataclass(frozen=True)
class Leak:
  """`split`/`file_name` duplicates `other_split`/`other_file_name`."""
  split: str
  file_name: str
  other_split: str
  other_file_name: str
  kind: str         # 'exact' or 'near'
  distance_a: int
  distance_b: int

  def other(self) -> str:
    """'other_split/other_file_name (exact copy | near copy, pHash distances ...)'."""
    how = ('exact copy' if self.kind == 'exact' else
           f'near copy, pHash distances A {self.distance_a}, B {self.distance_b}')
    return f'{self.other_split}/{self.other_file_name} ({how})'

  def describe(self) -> str:
    return f'{self.split}/{self.file_name} = {self.other()}'


def exact_digest(a: np.ndarray, b: np.ndarray, label: np.ndarray) -> bytes:
  """SHA-256 of the pixels (and shapes, dtypes) of A, B and label."""
  h = hashlib.sha256()
  for x in (a, b, label):
    h.update(f'{x.dtype.str}{x.shape}'.encode())
    h.update(np.ascontiguousarray(x).data)
  return h.digest()


def _phash(channel: np.ndarray) -> tuple[int, float]:
  """[32, 32] float32 thumbnail -> (64-bit DCT pHash, the thumbnail's standard deviation)."""
  low = cv2.dct(np.ascontiguousarray(channel))[:8, :8].ravel()[1:]
  bits = np.zeros(64, bool)
  bits[:63] = low > np.median(low)
  return int(np.packbits(bits).view('>u8')[0]), float(channel.std())


def _thumbnail(image: np.ndarray) -> np.ndarray:
  """[H, W, 3] RGB -> [32, 32, 3] float32 area means (luma and R - B are linear: taken after)."""
  return cv2.resize(image.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)


def perceptual_hash(image: np.ndarray) -> tuple[int, bool]:
  """[H, W, 3] uint8 RGB -> (64-bit luma pHash, whether the image has texture enough for it)."""
  h, std = _phash(_thumbnail(image) @ np.float32([0.299, 0.587, 0.114]))
  return h, std >= MIN_TEXTURE


def colour_hash(image: np.ndarray) -> tuple[int, bool]:
  """[H, W, 3] uint8 RGB -> (64-bit pHash of R - B, whether the image has colour enough)."""
  thumb = _thumbnail(image)
  h, std = _phash(thumb[..., 0] - thumb[..., 2])
  return h, std >= MIN_COLOUR


def pair_hashes(a: np.ndarray, b: np.ndarray, label: np.ndarray) -> PairHashes:
  """The exact digest and the perceptual hashes of one decoded pair."""
  hashes = []
  for image in (a, b):
    thumb = _thumbnail(image)
    luma, t = _phash(thumb @ np.float32([0.299, 0.587, 0.114]))
    colour, c = _phash(thumb[..., 0] - thumb[..., 2])
    hashes.append((luma, t >= MIN_TEXTURE, colour, c >= MIN_COLOUR))
  (ha, ta, ca, cta), (hb, tb, cb, ctb) = hashes
  return PairHashes(exact_digest(a, b, label), ha, hb, ta and tb, ca, cb, cta and ctb)


def hamming(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Bitwise Hamming distances of uint64 hashes (broadcast), as uint8."""
  return np.bitwise_count(np.bitwise_xor(x, y)).astype(np.uint8)


class HashTable:
  """The hashes of one split's pairs, appended while the split streams."""

  def __init__(self, split: str):
    self.split = split
    self.names: list[str] = []
    self._rows: list[PairHashes] = []
    self._cache = None

  def __len__(self) -> int:
    return len(self.names)

  def add(self, name: str, hashes: PairHashes) -> None:
    self.names.append(name)
    self._rows.append(hashes)
    self._cache = None

  def arrays(self):
    """(digest -> row indices, {field: numpy array} of the hashes and flags)."""
    if self._cache is None:
      index = collections.defaultdict(list)
      for i, r in enumerate(self._rows):
        index[r.digest].append(i)
      cols = {k: np.array([getattr(r, k) for r in self._rows], np.uint64)
              for k in ('a', 'b', 'ca', 'cb')}
      cols.update({k: np.array([getattr(r, k) for r in self._rows], bool)
                   for k in ('textured', 'coloured')})
      self._cache = (dict(index), cols)
    return self._cache

  def within_split_exact(self) -> int:
    """Pairs that are exact copies of an earlier pair of the same split."""
    return len(self._rows) - len(self.arrays()[0])


def match(query: HashTable, ref: HashTable, threshold: int = NEAR_THRESHOLD,
          colour_threshold: int = COLOUR_THRESHOLD) -> list[Leak]:
  """Every (query pair, reference pair) that is an exact or near duplicate, query order."""
  q_index, q = query.arrays()
  r_index, r = ref.arrays()
  found = {}
  for digest, rows in q_index.items():
    for i in rows:
      for j in r_index.get(digest, ()):
        found[i, j] = Leak(query.split, query.names[i], ref.split, ref.names[j], 'exact', 0, 0)
  n_q, n_r = len(q['a']), len(r['a'])
  rows = max(1, _BLOCK // max(n_r, 1))
  for start in range(0, n_q if n_r else 0, rows):
    stop = min(start + rows, n_q)
    # Luma of A over the whole block; the other hashes only for its few candidates.
    near = hamming(q['a'][start:stop, None], r['a'][None, :]) <= threshold
    near &= q['textured'][start:stop, None] & r['textured'][None, :]
    i, j = np.nonzero(near)
    i += start
    da, db = hamming(q['a'][i], r['a'][j]), hamming(q['b'][i], r['b'][j])
    colour = np.maximum(hamming(q['ca'][i], r['ca'][j]), hamming(q['cb'][i], r['cb'][j]))
    keep = (db <= threshold) & ((colour <= colour_threshold) |
                                ~(q['coloured'][i] & r['coloured'][j]))
    for i_, j_, da_, db_ in zip(i[keep].tolist(), j[keep].tolist(), da[keep].tolist(),
                                db[keep].tolist()):
      found.setdefault((i_, j_), Leak(query.split, query.names[i_], ref.split,
                                      ref.names[j_], 'near', da_, db_))
  return [found[k] for k in sorted(found)]


def find_leaks(tables: Sequence[HashTable], threshold: int = NEAR_THRESHOLD) -> list[Leak]:
  """Leaks between every two of `tables` (each pair of splits once, in the order given)."""
  leaks = []
  for i, query in enumerate(tables):
    for ref in tables[i + 1:]:
      leaks += match(query, ref, threshold)
  return leaks


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'--on_leak={mode!r} is not one of {list(MODES)}')


def summary(leaks: Sequence[Leak], limit: int = 3) -> str:
  """'N leak(s) (E exact, M near): first, second, ... (+K more)' in one line."""
  exact = sum(lk.kind == 'exact' for lk in leaks)
  head = '; '.join(lk.describe() for lk in leaks[:limit])
  more = f' (+{len(leaks) - limit} more)' if len(leaks) > limit else ''
  return (f'{len(leaks)} pair(s) duplicated across splits ({exact} exact, '
          f'{len(leaks) - exact} near): {head}{more}')


def report(leaks: Sequence[Leak], mode: str, tables: Sequence[HashTable],
           dropped: Sequence[str] = ()) -> dict:
  """The dataset_info.json "leaks" entry."""
  counts = collections.Counter(f'{lk.split}/{lk.other_split}' for lk in leaks)
  return {
      'on_leak': mode,
      'method': ('exact: SHA-256 of the decoded A, B and label pixels; near: 64-bit DCT '
                 f'pHash of A and of B, both Hamming distances <= {NEAR_THRESHOLD}, and of '
                 f'their R - B within {COLOUR_THRESHOLD} where coloured '
                 '(segchange_jax.data.leaks)'),
      'near_threshold': NEAR_THRESHOLD,
      'colour_threshold': COLOUR_THRESHOLD,
      'num_leaks': len(leaks),
      'num_exact': sum(lk.kind == 'exact' for lk in leaks),
      'num_near': sum(lk.kind == 'near' for lk in leaks),
      'counts': dict(sorted(counts.items())),
      'within_split_exact': {t.split: t.within_split_exact() for t in tables},
      'num_dropped': len(dropped),
      'dropped': list(dropped),
      'pairs': [dataclasses.asdict(lk) for lk in leaks],
  }
