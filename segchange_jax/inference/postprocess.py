"""Shape post-processing of change masks and their export as polygons.

Filter (upstream's large-raster post-processing): keep an 8-connected change component when
  area >= min_area px, perimeter / area <= max_perimeter_ratio and
  area / convex-hull area >= min_convexity.
Perimeter is the number of exposed pixel edges (outer boundary and holes, px); the convex hull is
taken over pixel corners, so a filled rectangle has convexity exactly 1.
Unlike upstream (per 512 window, before blending), we filter the blended scene mask, so
components cut by window edges are judged whole. This pass holds the whole mask
(uint8 + int32 labels, 5 bytes/px): it is the one step not bounded by the window size.
"""

from __future__ import annotations

from typing import Any

from affine import Affine
import cv2
import numpy as np
import rasterio.features
import shapely.geometry

_CORNERS = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]], np.float32)


def component_shapes(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """8-connected components of a bool mask -> (labels, area px, perimeter px, bbox [n, 4] x,y,w,h).

  Index 0 of the per-component arrays is the background.
  """
  n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8,
                                                        ltype=cv2.CV_32S)
  area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
  # Exposed edges: a pixel edge whose neighbour (outside the raster counts) has another label.
  padded = np.pad(labels, 1)
  core = padded[1:-1, 1:-1]
  perim = np.zeros(n, np.float64)
  for nb in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
    exposed = (core != nb) & (core > 0)
    perim += np.bincount(core[exposed], minlength=n)
  return labels, area, perim, stats[:, :4]


def convex_area(labels: np.ndarray, k: int, bbox: np.ndarray) -> float:
  """Area of the convex hull of component k's pixel squares (px)."""
  x, y, w, h = (int(v) for v in bbox)
  crop = (labels[y:y + h, x:x + w] == k).astype(np.uint8)
  contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  centres = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
  corners = (centres[:, None, :] + _CORNERS[None]).reshape(-1, 2)
  return float(cv2.contourArea(cv2.convexHull(corners)))


def filter_components(mask: np.ndarray, min_area: int, max_perimeter_ratio: float,
                      min_convexity: float, nodata: int | None = None) -> np.ndarray:
  """Removes change components failing the shape rules; other pixels (and nodata) unchanged."""
  fg = (mask > 0) if nodata is None else (mask > 0) & (mask != nodata)
  labels, area, perim, bbox = component_shapes(fg)
  keep = (area >= min_area) & (perim <= max_perimeter_ratio * area)
  keep[0] = False
  # The hull is needed only for components that passed the cheap tests.
  if min_convexity > 0:
    for k in np.flatnonzero(keep):
      keep[k] = area[k] >= min_convexity * convex_area(labels, int(k), bbox[k])
  out = mask.copy()
  out[fg & ~keep[labels]] = 0
  return out


def polygons(mask: np.ndarray, transform: Affine | None, crs: Any,
             nodata: int | None = None) -> dict:
  """GeoJSON FeatureCollection of change regions in the raster's CRS.

  Properties: value (class id), area (map units^2; px^2 without georeferencing), area_px.
  """
  transform = transform or Affine.identity()
  px_area = abs(transform.determinant)
  fg = (mask > 0) if nodata is None else (mask > 0) & (mask != nodata)
  features = []
  for geom, value in rasterio.features.shapes(mask, mask=fg, transform=transform, connectivity=8):
    shape = shapely.geometry.shape(geom)
    features.append({'type': 'Feature', 'geometry': geom,
                     'properties': {'value': int(value), 'area': float(shape.area),
                                    'area_px': int(round(shape.area / px_area))}})
  fc = {'type': 'FeatureCollection', 'features': features}
  if crs is not None:
    epsg = crs.to_epsg()
    name = f'urn:ogc:def:crs:EPSG::{epsg}' if epsg else crs.to_wkt()
    fc['crs'] = {'type': 'name', 'properties': {'name': name}}
  return fc
