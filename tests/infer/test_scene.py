"""Engine tests (segchange_jax.inference.sliding_window) with in-memory sources and toy
predictors."""

from __future__ import annotations

import numpy as np
import pytest

from segchange_jax.inference import sliding_window
from tests.infer import scene_helpers as h


class MemPair:
  """In-memory PairSource over HWC arrays; records every read."""

  def __init__(self, a, b, valid=None):
    self.a, self.b = a, b
    self.valid = np.ones(a.shape[:2], bool) if valid is None else valid
    self.height, self.width = a.shape[:2]
    self.reads = []

  def read(self, y, x, hh, ww):
    self.reads.append((y, x, hh, ww))
    s = np.s_[y:y + hh, x:x + ww]
    return self.a[s].copy(), self.b[s].copy(), self.valid[s].copy()


class MemSink:
  """Collects rows; asserts they arrive in order, without gaps, in whole blocks."""

  def __init__(self, height, width, channels=1, block_rows=16):
    self.block_rows = block_rows
    self.probs = np.full((height, width, channels), -1.0, np.float32)
    self.valid = np.zeros((height, width), bool)
    self.next_row = 0
    self.height = height

  def write(self, row0, probs, valid):
    assert row0 == self.next_row
    end = row0 + probs.shape[0]
    assert end == self.height or end % self.block_rows == 0
    self.probs[row0:end] = probs
    self.valid[row0:end] = valid
    self.next_row = end


def _run(a, b, predict, window, overlap, batch=3, valid=None, channels=1, block_rows=16):
  src = MemPair(a, b, valid)
  sink = MemSink(a.shape[0], a.shape[1], channels, block_rows)
  stats = sliding_window.run_scene(src, predict, sink, window=window, overlap=overlap,
                                   batch_size=batch, channels=channels, progress=False)
  assert sink.next_row == a.shape[0]
  return sink, stats, src


def _hwc_pair(hh, ww, seed=0):
  a, b = h.pair_arrays(hh, ww, seed)
  return a.transpose(1, 2, 0).copy(), b.transpose(1, 2, 0).copy()


@pytest.mark.parametrize('size,window,overlap,expected', [
    (100, 32, 8, [0, 24, 48, 68]), (64, 32, 0, [0, 32]), (20, 32, 8, [0]), (33, 32, 4, [0, 1])])
def test_window_starts_clamped(size, window, overlap, expected):
  assert sliding_window.window_starts(size, window, overlap).tolist() == expected


def test_hann_ramps_partition_of_unity():
  w = sliding_window.ramp(32, 8, True, True)
  assert w.min() > 0 and np.all(w[8:24] == 1)
  # Right ramp of one window + left ramp of the next over the same 8 px sum to 1.
  np.testing.assert_allclose(w[-8:] + w[:8], 1.0, atol=1e-6)


@pytest.mark.parametrize('hh,ww', [(77, 101), (64, 64), (131, 45)])
def test_pointwise_predictor_is_seamless_everywhere(hh, ww):
  a, b = _hwc_pair(hh, ww)
  pointwise = lambda x, y: 1.0 / (1.0 + np.exp(-np.abs(x.astype(np.float32) - y).mean(-1) / 50.0))
  sink, _, _ = _run(a, b, pointwise, window=32, overlap=8)
  np.testing.assert_allclose(sink.probs[..., 0], pointwise(a[None], b[None])[0], atol=1e-6)


def _fit_mask(size, window, overlap, margin):
  """Pixels at >= margin px from every internal edge of every window covering them (1-D)."""
  ok = np.ones(size, bool)
  for s in sliding_window.window_starts(size, window, overlap):
    idx = np.arange(s, s + window)
    bad = np.zeros(window, bool)
    if s > 0:
      bad[:margin] = True
    if s + window < size:
      bad[window - margin:] = True
    ok[idx[bad]] = False
  return ok


def test_local_predictor_windowed_equals_whole_image():
  hh, ww, window, overlap = 97, 120, 32, 8
  a, b = _hwc_pair(hh, ww, seed=1)
  sink, stats, _ = _run(a, b, h.box_change, window, overlap)
  whole = h.box_change(a[None], b[None])[0]
  fit = _fit_mask(hh, window, overlap, 1)[:, None] & _fit_mask(ww, window, overlap, 1)[None, :]
  assert fit.mean() > 0.85
  np.testing.assert_allclose(sink.probs[..., 0][fit], whole[fit], atol=1e-6)
  # Elsewhere the blend is not exact but close: the edge pixels get small Hann weights.
  assert np.abs(sink.probs[..., 0] - whole).max() < 0.2
  assert stats.windows == 4 * 5


def test_overlap_average_is_the_weighted_formula():
  hh, ww, window, overlap = 70, 90, 32, 12
  a, b = _hwc_pair(hh, ww, seed=2)
  # A constant per window (its mean of A), with 2 channels to cover the multi-class path.
  def const(x, y):
    m = x.astype(np.float32).mean((1, 2, 3)) / 255.0
    return np.broadcast_to(np.stack([m, 1 - m], -1)[:, None, None, :], x.shape[:3] + (2,))
  sink, _, _ = _run(a, b, const, window, overlap, channels=2)
  # Independent dense computation of sum_k w_k c_k / sum_k w_k.
  def taper(start, size):
    w = np.ones(window)
    t = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
    if start > 0:
      w[:overlap] = t
    if start + window < size:
      w[-overlap:] = t[::-1]
    return w
  num = np.zeros((hh, ww))
  den = np.zeros((hh, ww))
  for y in (0, 20, 38):
    for x in (0, 20, 40, 58):
      c = a[y:y + window, x:x + window].astype(np.float64).mean() / 255.0
      wt = np.outer(taper(y, hh), taper(x, ww))
      num[y:y + window, x:x + window] += wt * c
      den[y:y + window, x:x + window] += wt
  np.testing.assert_allclose(sink.probs[..., 0], num / den, atol=1e-5)
  np.testing.assert_allclose(sink.probs[..., 1], 1 - num / den, atol=1e-5)
  # Single coverage (top-left corner) is the window's exact constant.
  c0 = a[:window, :window].astype(np.float64).mean() / 255.0
  np.testing.assert_allclose(sink.probs[:20, :20, 0], c0, atol=1e-6)


@pytest.mark.parametrize('hh,ww', [(20, 27), (31, 30), (5, 3)])
def test_raster_smaller_than_window_is_padded_and_cropped(hh, ww):
  a, b = _hwc_pair(hh, ww, seed=3)
  seen = []
  def record(x, y):
    seen.append(x.shape)
    return h.box_change(x, y)
  sink, stats, _ = _run(a, b, record, window=32, overlap=8, batch=2)
  assert stats.windows == 1 and seen == [(2, 32, 32, 3)]
  mode = 'reflect' if min(hh, ww) > 1 else 'edge'
  pad = ((0, 32 - hh), (0, 32 - ww), (0, 0))
  expected = h.box_change(np.pad(a, pad, mode=mode)[None],
                          np.pad(b, pad, mode=mode)[None])[0, :hh, :ww]
  np.testing.assert_allclose(sink.probs[..., 0], expected, atol=1e-6)


def test_nodata_is_neutral_for_the_model_and_nodata_in_output():
  hh, ww = 64, 80
  a, b = _hwc_pair(hh, ww, seed=4)
  valid = np.ones((hh, ww), bool)
  valid[10:30, 5:50] = False
  valid[:, -3:] = False
  inputs = []
  def record(x, y):
    inputs.append((x.copy(), y.copy()))
    return h.box_change(x, y)
  sink, _, src = _run(a, b, record, window=32, overlap=8, batch=4, valid=valid)
  np.testing.assert_array_equal(sink.valid, valid)
  # Every invalid pixel reached the model as the same neutral colour in A and B.
  origins = [(y, x) for y, x, _, _ in src.reads]
  xs = [x for x, _ in inputs]
  ys = [y for _, y in inputs]
  ax = np.concatenate(xs)[:len(origins)]
  by = np.concatenate(ys)[:len(origins)]
  for (y0, x0), wa, wb in zip(origins, ax, by):
    inv = ~valid[y0:y0 + 32, x0:x0 + 32]
    assert np.all(wa[inv] == sliding_window.NEUTRAL_RGB)
    assert np.all(wb[inv] == sliding_window.NEUTRAL_RGB)


def test_all_nodata_batches_skip_the_model():
  a, b = _hwc_pair(64, 64)
  calls = []
  def record(x, y):
    calls.append(1)
    return h.box_change(x, y)
  sink, stats, _ = _run(a, b, record, 32, 0, batch=1, valid=np.zeros((64, 64), bool))
  assert not calls and stats.predicted_batches == 0 and not sink.valid.any()


class ProceduralPair:
  """A large scene generated per window (never held whole)."""

  def __init__(self, size):
    self.height = self.width = size

  def read(self, y, x, hh, ww):
    yy, xx = np.mgrid[y:y + hh, x:x + ww]
    a = ((yy * 7 + xx * 13) % 251).astype(np.uint8)[..., None].repeat(3, -1)
    b = a.copy()
    b[(yy // 300 + xx // 300) % 2 == 0] = 255
    return a, b, np.ones((hh, ww), bool)


class CountingSink:
  block_rows = 256

  def __init__(self):
    self.rows = 0
    self.checksum = 0.0

  def write(self, row0, probs, valid):
    assert row0 == self.rows
    self.rows += probs.shape[0]
    self.checksum += float(probs.sum())


def test_strip_buffers_stay_bounded():
  window, overlap, batch, block = 256, 32, 8, 256
  rows = {}
  for size in (2048, 4096):
    sink = CountingSink()
    pointwise = lambda x, y: (x[..., 0] != y[..., 0]).astype(np.float32)
    stats = sliding_window.run_scene(ProceduralPair(size), pointwise, sink, window=window,
                            overlap=overlap, batch_size=batch, progress=False)
    assert sink.rows == size
    assert stats.windows == len(sliding_window.window_starts(size, window, overlap)) ** 2
    # A batch spans at most 2 window rows here (>= 8 windows a row): the strip holds one
    # window, one stride and less than one output block, whatever the scene height.
    assert stats.max_buffer_rows <= window + (window - overlap) + block - 1
    assert stats.buffer_bytes <= stats.max_buffer_rows * size * (4 + 4 + 1)
    rows[size] = stats.max_buffer_rows
  assert rows[4096] == rows[2048]
