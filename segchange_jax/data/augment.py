"""Paired training augmentations (numpy/OpenCV on uint8): one random draw for A, B and label.

Order and semantics follow upstream SegChange-R1's training transforms (config.data.augment):
  color jitter (prob apply_prob): HSV saturation and value scaled by factors in
      [1 - j, 1 + j], then every RGB value scaled by a "contrast" factor in the same range;
  rotation (prob apply_prob): +-rotation_degree about (w // 2, h // 2); images bilinear, label
      nearest, zero border;
  hflip / vflip (prob 0.5 each; off by default, as upstream);
  gamma (always): x -> 255 (x / 255) ** g, g uniform in gamma_range, truncated to uint8;
  affine (prob 0.2 when affine_degree > 0): corners moved inward by up to 10 % of the size
      (upstream's rule; the degree value only switches it on);
  random erase (prob erase_prob): a box of 2-40 % of the area, aspect ratio in erase_ratio,
      filled with noise in A and B (label unchanged);
  Gaussian blur (always when blur_sigma > 0): kernel int(4 sigma) + 1 made odd;
  CLAHE (prob clahe): clip 2, 8x8 tiles on L of LAB.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

cv2.setNumThreads(1)  # Grain parallelises across examples already

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def color_jitter(a: np.ndarray, b: np.ndarray, sat: float, val: float,
                 contrast: float) -> tuple[np.ndarray, np.ndarray]:
  def one(x):
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] *= sat
    hsv[..., 2] *= val
    x = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
    return np.clip(x.astype(np.float32) * contrast, 0, 255).astype(np.uint8)
  return one(a), one(b)


def warp(arrays: Arrays, matrix: np.ndarray) -> Arrays:
  """Same affine warp for A, B (bilinear) and label (nearest), zero border."""
  h, w = arrays[0].shape[:2]
  a, b = (cv2.warpAffine(x, matrix, (w, h), flags=cv2.INTER_LINEAR) for x in arrays[:2])
  label = cv2.warpAffine(arrays[2], matrix, (w, h), flags=cv2.INTER_NEAREST)
  return a, b, label


def gamma_lut(gamma: float) -> np.ndarray:
  return ((np.arange(256) / 255.0) ** gamma * 255.0).astype(np.uint8)


def clahe(x: np.ndarray) -> np.ndarray:
  lab = cv2.cvtColor(x, cv2.COLOR_RGB2LAB)
  lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[..., 0])
  return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def augment_pair(a: np.ndarray, b: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 cfg: Any) -> Arrays:
  """Applies config.data.augment (`cfg`, ConfigDict or dict) with randomness from `rng`."""
  get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
  if not get('enabled', True):
    return a, b, label
  p = get('apply_prob', 0.5)
  h, w = a.shape[:2]
  jit = get('color_jitter', 0.0)
  if jit > 0 and rng.random() < p:
    sat, val, con = rng.uniform(1 - jit, 1 + jit, 3)
    a, b = color_jitter(a, b, sat, val, con)
  deg = get('rotation_degree', 0.0)
  if deg > 0 and rng.random() < p:
    m = cv2.getRotationMatrix2D((w // 2, h // 2), float(rng.uniform(-deg, deg)), 1.0)
    a, b, label = warp((a, b, label), m)
  for flag, axis in (('hflip', 1), ('vflip', 0)):
    if get(flag, False) and rng.random() < 0.5:
      a, b, label = (np.ascontiguousarray(np.flip(x, axis)) for x in (a, b, label))
  lo, hi = get('gamma_range', (1.0, 1.0))
  if (lo, hi) != (1.0, 1.0):
    lut = gamma_lut(float(rng.uniform(lo, hi)))
    a, b = cv2.LUT(a, lut), cv2.LUT(b, lut)
  if get('affine_degree', 0.0) > 0 and rng.random() < 0.2:
    src = np.float32([[0, 0], [w, 0], [0, h]])
    dst = np.float32([[rng.uniform(0, .1 * w), rng.uniform(0, .1 * h)],
                      [rng.uniform(.9 * w, w), rng.uniform(0, .1 * h)],
                      [rng.uniform(0, .1 * w), rng.uniform(.9 * h, h)]])
    a, b, label = warp((a, b, label), cv2.getAffineTransform(src, dst))
  erase_prob = get('erase_prob', 0.0)
  if erase_prob > 0 and rng.random() < erase_prob:
    a, b = _erase(a, b, rng, get('erase_ratio', (0.3, 3.3)))
  sigma = get('blur_sigma', 0.0)
  if sigma > 0:
    k = int(4 * sigma) + 1
    k += 1 - k % 2
    a, b = (cv2.GaussianBlur(x, (k, k), sigma) for x in (a, b))
  if rng.random() < get('clahe', 0.0):
    a, b = clahe(a), clahe(b)
  return a, b, label


def _erase(a, b, rng, ratio):
  h, w = a.shape[:2]
  aspect = max(float(rng.uniform(*ratio)), 1e-3)
  area = rng.uniform(0.02, 0.4) * h * w
  eh, ew = int(np.sqrt(area * aspect)), int(np.sqrt(area / aspect))
  if not 0 < eh < h or not 0 < ew < w:
    return a, b
  y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
  a, b = a.copy(), b.copy()
  a[y:y + eh, x:x + ew] = rng.integers(0, 256, (eh, ew, 3), dtype=np.uint8)
  b[y:y + eh, x:x + ew] = rng.integers(0, 256, (eh, ew, 3), dtype=np.uint8)
  return a, b
