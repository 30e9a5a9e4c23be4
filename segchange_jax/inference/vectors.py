"""Change polygons as GIS vector files, written feature by feature (never one big dict).

Formats follow the file extension:
- `.geojson` / `.json`: RFC 7946 GeoJSON: coordinates in WGS 84 longitude/latitude
  (EPSG:4326, no `crs` member), exterior rings counter-clockwise, 7 decimals (~1 cm).
- `.gpkg` (GeoPackage) and `.fgb` (FlatGeobuf): the raster's own CRS, through pyogrio (GDAL/OGR),
  written in chunks of CHUNK features.
Every feature carries `value` (class id), `area` (map units^2 of the raster CRS, computed on the
native geometry, not on the reprojected one) and `area_px`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

import numpy as np
import rasterio.features
import rasterio.warp
import shapely
import shapely.geometry
from affine import Affine

GEOJSON_SUFFIXES = ('.geojson', '.json')
OGR_DRIVERS = {'.gpkg': 'GPKG', '.fgb': 'FlatGeobuf'}
SUFFIXES = GEOJSON_SUFFIXES + tuple(OGR_DRIVERS)
CHUNK = 4096
DECIMALS = 7


class VectorError(ValueError):
  """A vector output cannot be written as asked; the message names the flag and the fix."""


def check_path(path: str, georeferenced: bool, flag: str = '--polygons') -> None:
  """Refuses an unknown extension, and GeoJSON for inputs without a CRS (RFC 7946 is WGS 84)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in SUFFIXES:
    raise VectorError(f'{flag} {path}: unsupported vector format {ext!r}; use .geojson '
                      '(RFC 7946, WGS 84), .gpkg (GeoPackage) or .fgb (FlatGeobuf)')
  if ext in GEOJSON_SUFFIXES and not georeferenced:
    raise VectorError(f'{flag} {path}: GeoJSON (RFC 7946) needs georeferenced inputs; these have '
                      'no CRS. Use .gpkg or .fgb (pixel coordinates)')


def iter_features(mask: np.ndarray, transform: Affine | None, nodata: int | None = None
                  ) -> Iterator[tuple[Any, int, float, int]]:
  """(native shapely polygon, value, area in map units^2, area in px) per change region."""
  transform = transform or Affine.identity()
  px_area = abs(transform.a * transform.e - transform.b * transform.d)
  fg = (mask > 0) if nodata is None else (mask > 0) & (mask != nodata)
  for geom, value in rasterio.features.shapes(mask, mask=fg, transform=transform, connectivity=8):
    shape = shapely.geometry.shape(geom)
    yield shape, int(value), float(shape.area), int(round(shape.area / px_area))


def write_geojson(path: str, features: Iterable[tuple[Any, int, float, int]], crs) -> int:
  """Streams RFC 7946 GeoJSON (EPSG:4326) to `path`; returns the number of features."""
  n = 0
  with open(path, 'w') as f:
    f.write('{"type": "FeatureCollection", "features": [\n')
    for shape, value, area, area_px in features:
      geom = rasterio.warp.transform_geom(crs, 'EPSG:4326', shapely.geometry.mapping(shape),
                                          precision=DECIMALS)
      # RFC 7946 section 3.1.6: exterior rings counter-clockwise, holes clockwise.
      geom = shapely.geometry.mapping(shapely.geometry.polygon.orient(
          shapely.geometry.shape(geom), 1.0))
      feature = {'type': 'Feature', 'geometry': geom,
                 'properties': {'value': value, 'area': area, 'area_px': area_px}}
      f.write((',\n' if n else '') + json.dumps(feature))
      n += 1
    f.write('\n]}\n')
  return n


def write_ogr(path: str, features: Iterable[tuple[Any, int, float, int]], crs) -> int:
  """Streams polygons in the raster CRS to a GeoPackage / FlatGeobuf; returns the count."""
  import pyogrio.raw  # pylint: disable=g-import-not-at-top
  driver = OGR_DRIVERS[os.path.splitext(path)[1].lower()]
  crs_wkt = crs.to_wkt() if crs is not None else None
  n, chunk = 0, []

  def flush(first: bool) -> None:
    geoms = np.array([shapely.to_wkb(s) for s, *_ in chunk], dtype=object)
    fields = [np.array([c[1] for c in chunk], np.int32), np.array([c[2] for c in chunk]),
              np.array([c[3] for c in chunk], np.int64)]
    pyogrio.raw.write(path, geoms, fields, ['value', 'area', 'area_px'], driver=driver,
                      crs=crs_wkt, geometry_type='Polygon', layer='change', append=not first)

  for item in features:
    chunk.append(item)
    if len(chunk) == CHUNK:
      flush(n == 0)
      n += len(chunk)
      chunk = []
  if chunk or n == 0:
    flush(n == 0)
    n += len(chunk)
  return n


def write(path: str, features: Iterable[tuple[Any, int, float, int]], crs) -> int:
  """Writes `features` in the format of `path`'s extension (module docstring)."""
  if os.path.splitext(path)[1].lower() in GEOJSON_SUFFIXES:
    return write_geojson(path, features, crs)
  return write_ogr(path, features, crs)
