"""Whole-scene passes after the windowed engine (segchange_jax.infer): the finished mask, its
shape-filtered rewrite and the preview picture. These hold the whole mask (1 byte/px, or
P bytes/px for P prompts answered in one pass: one mask band per prompt)."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np

from segchange_jax.inference import raster_io

PREVIEW_SIDE = 512  # longest side of each preview panel (px)
# Overlay colour of each prompt's change in a several-prompt preview (cycled beyond six).
PROMPT_RGB = ((255, 0, 0), (0, 160, 255), (255, 200, 0), (0, 200, 80), (200, 0, 255),
              (255, 255, 255))


def whole_mask(sink, probabilities: bool, threshold: float, groups: int = 1
               ) -> tuple[np.ndarray, int]:
  """The finished class mask (uint8) of the scratch GeoTIFF `sink` and its nodata value.

  [H, W]; with `groups` = P > 1 prompts [P, H, W], one mask per prompt.
  """
  with _scratch(sink.path) as ds:
    if probabilities:  # shapes come from the thresholded first band of each prompt
      bands = [1 + g * ds.count // groups for g in range(groups)]
      p = ds.read(bands)
      mask = np.where(np.isnan(p), raster_io.MASK_NODATA, p > threshold).astype(np.uint8)
    else:
      mask = ds.read(list(range(1, groups + 1)))
  return (mask[0] if groups == 1 else mask), raster_io.MASK_NODATA


def changed_shares(mask: np.ndarray, nodata: int | None, transform, crs) -> list[dict]:
  """Per mask band ([H, W] or [P, H, W]): changed pixels, their share of the valid (not nodata)
  pixels and, in a projected CRS with a linear unit (metres, feet, ...), their area in hectares
  (else None: no CRS, degrees, or no usable unit; the app's area line follows the same rule)."""
  bands = mask[None] if mask.ndim == 2 else mask
  valid = bands[0] != nodata if nodata is not None else np.ones(bands.shape[1:], bool)
  n_valid = int(valid.sum())
  hectares = None
  if crs is not None and crs.is_projected:
    try:
      _, metres = crs.linear_units_factor
    except Exception:  # pylint: disable=broad-except  # CRS without a usable unit definition
      metres = None
    if metres:
      hectares = abs(transform.determinant) * metres ** 2 / 1e4
  out = []
  for band in bands:
    changed = int(np.count_nonzero((band > 0) & valid))
    out.append({'pixels': changed, 'share': changed / max(n_valid, 1),
                'hectares': None if hectares is None else changed * hectares})
  return out


def rewrite_mask(path: str, mask: np.ndarray) -> None:
  """Replaces the scratch mask's pixels (tiles of a compressed file are best written once);
  `mask` [H, W] or [P, H, W] (one band per prompt, descriptions and band tags kept)."""
  import rasterio  # pylint: disable=g-import-not-at-top
  bands = mask[None] if mask.ndim == 2 else mask
  with _scratch(path) as ds:
    profile, tags = ds.profile, ds.tags()
    try:
      cmap = ds.colormap(1)
    except ValueError:  # none written (masks of 3+ prompts, raster_io.GeoTiffSink)
      cmap = None
    described = [(i, ds.descriptions[i - 1], ds.tags(i)) for i in ds.indexes]
  os.remove(path)
  with rasterio.open(path, 'w', **profile) as ds:
    ds.write(bands)
    ds.update_tags(**tags)
    if cmap is not None:
      ds.write_colormap(1, cmap)
    for i, description, band_tags in described:
      if description:
        ds.set_band_description(i, description)
      if band_tags:
        ds.update_tags(i, **band_tags)


@contextlib.contextmanager
def _scratch(path: str):
  """The scratch GeoTIFF opened for reading; plain inputs leave it without georeferencing on
  purpose, so rasterio's warning about that is silenced."""
  import rasterio  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
    with rasterio.open(path) as ds:
      yield ds


def write_preview(path: str, source, mask: np.ndarray, nodata: int | None) -> None:
  """A | B | overlay (change red on a darkened B), each panel at most PREVIEW_SIDE px.

  `mask` [P, H, W] (several prompts): prompt i's change in PROMPT_RGB[i], later prompts on top.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scale = min(1.0, PREVIEW_SIDE / max(source.height, source.width))
  shape = (max(1, round(source.height * scale)), max(1, round(source.width * scale)))
  a, b = source.overview(shape)
  overlay = (b.astype(np.float32) * 0.5).astype(np.uint8)
  for i, m in enumerate(mask[None] if mask.ndim == 2 else mask):
    small = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    change = (small > 0) if nodata is None else (small > 0) & (small != nodata)
    overlay[change] = PROMPT_RGB[i % len(PROMPT_RGB)]
  gap = np.full((shape[0], 4, 3), 128, np.uint8)
  Image.fromarray(np.concatenate([a, gap, b, gap, overlay], axis=1)).save(path, format='PNG')
