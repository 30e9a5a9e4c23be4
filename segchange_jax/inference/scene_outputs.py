"""Whole-scene passes after the windowed engine (segchange_jax.infer): the finished mask, its
shape-filtered rewrite and the preview picture. These hold the whole mask (1 byte/px)."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np

from segchange_jax.inference import raster_io

PREVIEW_SIDE = 512  # longest side of each preview panel (px)


def whole_mask(sink, probabilities: bool, threshold: float) -> tuple[np.ndarray, int]:
  """The finished class mask (uint8) of the scratch GeoTIFF `sink` and its nodata value."""
  with _scratch(sink.path) as ds:
    if probabilities:  # shapes come from the thresholded first band
      p = ds.read(1)
      mask = np.where(np.isnan(p), raster_io.MASK_NODATA, p > threshold).astype(np.uint8)
    else:
      mask = ds.read(1)
  return mask, raster_io.MASK_NODATA


def rewrite_mask(path: str, mask: np.ndarray) -> None:
  """Replaces the scratch mask's pixels (tiles of a compressed file are best written once)."""
  import rasterio  # pylint: disable=g-import-not-at-top
  with _scratch(path) as ds:
    profile, tags, cmap = ds.profile, ds.tags(), ds.colormap(1)
  os.remove(path)
  with rasterio.open(path, 'w', **profile) as ds:
    ds.write(mask[None])
    ds.update_tags(**tags)
    ds.write_colormap(1, cmap)


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
  """A | B | overlay (change red on a darkened B), each panel at most PREVIEW_SIDE px."""
  import cv2  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scale = min(1.0, PREVIEW_SIDE / max(source.height, source.width))
  shape = (max(1, round(source.height * scale)), max(1, round(source.width * scale)))
  a, b = source.overview(shape)
  small = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
  change = (small > 0) if nodata is None else (small > 0) & (small != nodata)
  overlay = (b.astype(np.float32) * 0.5).astype(np.uint8)
  overlay[change] = (255, 0, 0)
  gap = np.full((shape[0], 4, 3), 128, np.uint8)
  Image.fromarray(np.concatenate([a, gap, b, gap, overlay], axis=1)).save(path, format='PNG')
