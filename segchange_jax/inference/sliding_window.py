"""Sliding-window change detection over scenes of any size, in bounded memory.

The engine is independent of file formats and of the model: a `PairSource` hands out
aligned windows of the two dates (uint8 RGB + a validity mask), `predict_probs` maps a batch
of uint8 window pairs to probabilities, and a `Sink` receives finished rows.

Rules (and how they differ from upstream engines/inference.py):
- Grid: windows of `window` px with stride `window - overlap`; the last window of a row or
  column is clamped to the raster edge. A raster smaller than the window is read whole and
  padded by reflection to the window size; its prediction is cropped back.
- Windows are read one batch at a time (the next batch is read in a thread while the current
  one is predicted) and every batch is padded to `batch_size` so a jitted model compiles once.
- Overlaps are blended in float32 with a separable Hann ramp of width `overlap` on every
  side that has a neighbouring window; the ramp is > 0 everywhere and 1 in the window's middle,
  and for two windows at the nominal overlap the ramps sum to 1, so
  out = sum_k w_k p_k / sum_k w_k is the exact value where one window covers a pixel, and
  equals p where all covering windows agree.
- Accumulators hold only a strip of rows (at most about 2 windows + one output block tall,
  whatever the scene height); rows no later window touches are normalised and flushed to the
  sink in whole output blocks (so compressed tiles are written once).
- Nodata: a pixel is valid only when valid in A and in B. Before the model sees a window,
  invalid pixels of both dates are replaced by the same neutral colour (the ImageNet mean,
  which normalises to ~0), so they carry no change signal; the sink writes nodata there.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Callable, Iterator, Protocol

import numpy as np
import tqdm

# Fill colour for invalid pixels: the ImageNet mean in uint8 (normalises to about 0).
NEUTRAL_RGB = np.array([124, 116, 104], np.uint8)

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class PairSource(Protocol):
  """Two co-registered dates on one pixel grid."""
  height: int
  width: int

  def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns A [h, w, 3] uint8, B [h, w, 3] uint8 and valid [h, w] bool (valid in A and B)."""


class Sink(Protocol):
  """Receives finished rows top to bottom."""
  block_rows: int

  def write(self, row0: int, probs: np.ndarray, valid: np.ndarray) -> None:
    """probs [rows, W, C] float32 in [0, 1]; valid [rows, W] bool."""


def window_starts(size: int, window: int, overlap: int) -> np.ndarray:
  """Start offsets along one axis: stride window - overlap, last one clamped to the edge."""
  if window <= 0 or not 0 <= overlap < window:
    raise ValueError(f'window={window}, overlap={overlap}: need window > 0 and '
                     '0 <= overlap < window')
  if size <= window:
    return np.zeros(1, np.int64)
  starts = np.arange(0, size - window, window - overlap)
  return np.append(starts, size - window)


def ramp(length: int, overlap: int, taper_start: bool, taper_end: bool) -> np.ndarray:
  """1-D blend weight: Hann ramps of `overlap` px on tapered sides, 1 elsewhere, never 0."""
  w = np.ones(length, np.float32)
  n = min(overlap, length // 2)
  if n > 0:
    rise = np.sin(0.5 * np.pi * (np.arange(n) + 0.5) / overlap) ** 2
    if taper_start:
      w[:n] = rise
    if taper_end:
      w[length - n:] = rise[::-1]
  return w


@dataclasses.dataclass(frozen=True)
class Grid:
  """The window layout of a height x width raster."""
  height: int
  width: int
  window: int
  overlap: int

  @property
  def read_shape(self) -> tuple[int, int]:
    """Size of every window read (smaller than `window` only for small rasters)."""
    return min(self.window, self.height), min(self.window, self.width)

  def windows(self) -> np.ndarray:
    """[N, 2] (y, x) window origins in row-major order."""
    ys = window_starts(self.height, self.window, self.overlap)
    xs = window_starts(self.width, self.window, self.overlap)
    return np.stack(np.meshgrid(ys, xs, indexing='ij'), -1).reshape(-1, 2)

  def weight(self, y: int, x: int) -> np.ndarray:
    """[h, w] blend weight of the window at (y, x); no taper on sides at the raster edge."""
    h, w = self.read_shape
    wy = ramp(h, self.overlap, y > 0, y + h < self.height)
    wx = ramp(w, self.overlap, x > 0, x + w < self.width)
    return wy[:, None] * wx[None, :]


@dataclasses.dataclass
class SceneStats:
  """What a run did; `max_buffer_rows` shows the strip memory bound."""
  windows: int = 0
  batches: int = 0
  predicted_batches: int = 0
  max_buffer_rows: int = 0
  buffer_bytes: int = 0
  seconds: float = 0.0
  # Several prompts: per prompt, the final mask's changed pixels ('pixels'), their share of the
  # valid pixels ('share') and hectares (None outside a metric projected CRS).
  changed: dict[str, dict] = dataclasses.field(default_factory=dict)


class StripAccumulator:
  """Weighted sums for rows [base, base + rows) of the scene, all columns."""

  def __init__(self, width: int, channels: int):
    self.width, self.channels = width, channels
    self.base = 0
    self.rows = 0
    self.psum = np.zeros((0, width, channels), np.float32)
    self.wsum = np.zeros((0, width), np.float32)
    self.valid = np.zeros((0, width), bool)

  def _ensure(self, end_row: int) -> None:
    need = end_row - self.base
    if need > self.psum.shape[0]:
      extra = need - self.psum.shape[0]
      self.psum = np.concatenate(
          [self.psum, np.zeros((extra, self.width, self.channels), np.float32)])
      self.wsum = np.concatenate([self.wsum, np.zeros((extra, self.width), np.float32)])
      self.valid = np.concatenate([self.valid, np.zeros((extra, self.width), bool)])
    self.rows = max(self.rows, need)

  def add(self, y: int, x: int, probs: np.ndarray, weight: np.ndarray, valid: np.ndarray) -> None:
    h, w = weight.shape
    self._ensure(y + h)
    r = y - self.base
    self.psum[r:r + h, x:x + w] += probs * weight[..., None]
    self.wsum[r:r + h, x:x + w] += weight
    self.valid[r:r + h, x:x + w] = valid

  def pop(self, end_row: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Normalised rows [base, end_row) and their validity; frees them."""
    n = end_row - self.base
    row0 = self.base
    wsum = self.wsum[:n]
    probs = self.psum[:n] / np.maximum(wsum, 1e-12)[..., None]
    valid = self.valid[:n] & (wsum > 0)
    # Shift the unfinished rows to the top instead of reallocating (the strip stays small).
    keep = self.psum.shape[0] - n
    self.psum[:keep] = self.psum[n:].copy()
    self.wsum[:keep] = self.wsum[n:].copy()
    self.valid[:keep] = self.valid[n:].copy()
    self.psum[keep:] = 0.0
    self.wsum[keep:] = 0.0
    self.valid[keep:] = False
    self.base = end_row
    self.rows = max(self.rows - n, 0)
    return row0, probs, valid

  @property
  def nbytes(self) -> int:
    return self.psum.nbytes + self.wsum.nbytes + self.valid.nbytes


def _read_batch(source: PairSource, grid: Grid, origins: np.ndarray):
  h, w = grid.read_shape
  reads = [source.read(int(y), int(x), h, w) for y, x in origins]
  a = np.stack([r[0] for r in reads])
  b = np.stack([r[1] for r in reads])
  valid = np.stack([r[2] for r in reads])
  # Invalid pixels become the same neutral colour in both dates: no change signal.
  a[~valid] = NEUTRAL_RGB
  b[~valid] = NEUTRAL_RGB
  return a, b, valid


def _model_batch(x: np.ndarray, window: int, batch_size: int) -> np.ndarray:
  """Pads a [n, h, w, 3] batch to [batch_size, window, window, 3] (reflect, then zeros)."""
  n, h, w, _ = x.shape
  if h < window or w < window:
    x = np.pad(x, ((0, 0), (0, window - h), (0, window - w), (0, 0)),
               mode='reflect' if min(h, w) > 1 else 'edge')
  if n < batch_size:
    x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
  return x


def _batches(origins: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
  for i in range(0, len(origins), batch_size):
    yield origins[i:i + batch_size]


def run_scene(source: PairSource, predict_probs: PredictFn, sink: Sink, *, window: int,
              overlap: int, batch_size: int, channels: int = 1,
              progress: bool = True, bar: tqdm.tqdm | None = None) -> SceneStats:
  """Predicts every window of `source`, blends overlaps and streams rows to `sink`.

  Args:
    source: the two dates on one grid.
    predict_probs: (a [n, window, window, 3] uint8, b same) -> [n, window, window] or
      [n, window, window, K] float probabilities; n is always `batch_size`.
    sink: receives finished rows, flushed in multiples of `sink.block_rows`.
    window, overlap, batch_size: grid and batching (module docstring).
    channels: probability channels predict_probs returns (1 binary, K classes).
    progress: show a tqdm bar over windows.
    bar: an open tqdm bar (total = number of windows) to advance instead of a new one; the
      caller closes it.

  Returns:
    SceneStats, including the largest strip the accumulators ever held.
  """
  start = time.perf_counter()
  grid = Grid(source.height, source.width, window, overlap)
  origins = grid.windows()
  h, w = grid.read_shape
  stats = SceneStats(windows=len(origins))
  acc = StripAccumulator(grid.width, channels)
  flushed = 0
  block = max(int(sink.block_rows), 1)
  own_bar = bar is None
  if own_bar:
    bar = tqdm.tqdm(total=len(origins), desc='windows', unit='win', disable=not progress,
                    mininterval=1.0)
  else:
    bar.set_description('windows')
  batches = list(_batches(origins, batch_size))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = pool.submit(_read_batch, source, grid, batches[0])
    for i, batch in enumerate(batches):
      a, b, valid = pending.result()
      if i + 1 < len(batches):  # read the next batch while this one is predicted
        pending = pool.submit(_read_batch, source, grid, batches[i + 1])
      n = len(batch)
      if valid.any():
        probs = np.asarray(predict_probs(_model_batch(a, window, batch_size),
                                         _model_batch(b, window, batch_size)), np.float32)
        if probs.ndim == 3:
          probs = probs[..., None]
        if probs.shape[-1] != channels:
          raise ValueError(f'predict_probs returned {probs.shape[-1]} channels, expected '
                           f'{channels}')
        probs = probs[:n, :h, :w]
        stats.predicted_batches += 1
      else:  # nothing valid: skip the model, the rows become nodata anyway
        probs = np.zeros((n, h, w, channels), np.float32)
      for (y, x), p, v in zip(batch, probs, valid):
        acc.add(int(y), int(x), p, grid.weight(int(y), int(x)), v)
      stats.max_buffer_rows = max(stats.max_buffer_rows, acc.rows)
      stats.buffer_bytes = max(stats.buffer_bytes, acc.nbytes)
      stats.batches += 1
      bar.update(n)
      # Rows above the next window's top are final; flush them in whole output blocks.
      done = int(batches[i + 1][0, 0]) if i + 1 < len(batches) else grid.height
      end = done if done == grid.height else (done // block) * block
      if end > flushed:
        row0, p, v = acc.pop(end)
        sink.write(row0, p, v)
        flushed = end
  if own_bar:
    bar.close()
  stats.seconds = time.perf_counter() - start
  return stats
