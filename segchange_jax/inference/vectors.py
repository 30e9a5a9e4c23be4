"""Change polygons as GIS vector files, written feature by feature (never one big dict).

The writers (`infer` picks one by the file extension from inference/formats.py):
- `write_geojson`: RFC 7946 GeoJSON: coordinates in WGS 84 longitude/latitude (EPSG:4326, no
  `crs` member), exterior rings counter-clockwise, 7 decimals (~1 cm).
- `write_ogr`: GeoPackage, FlatGeobuf or another OGR driver, in the raster's own CRS, through
  pyogrio (GDAL/OGR), written in chunks of CHUNK features.
Every feature carries `value` (class id), `area` (map units^2 of the raster CRS, computed on the
native geometry, not on the reprojected one) and `area_px`; with `prompt_field=True` (several
prompts answered in one pass, all in one layer) also `prompt`, the prompt whose mask it outlines.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from affine import Affine
import numpy as np
import rasterio.features
import rasterio.warp
import shapely
import shapely.geometry

CHUNK = 4096
DECIMALS = 7


def iter_features(mask: np.ndarray, transform: Affine | None, nodata: int | None = None,
                  prompt: str | None = None) -> Iterator[tuple]:
  """(native shapely polygon, value, area in map units^2, area in px) per change region, with
  `prompt` appended as a fifth item when given (the writers' prompt_field=True)."""
  transform = transform or Affine.identity()
  px_area = abs(transform.determinant)
  fg = (mask > 0) if nodata is None else (mask > 0) & (mask != nodata)
  for geom, value in rasterio.features.shapes(mask, mask=fg, transform=transform, connectivity=8):
    shape = shapely.geometry.shape(geom)
    item = (shape, int(value), float(shape.area), int(round(shape.area / px_area)))
    yield item if prompt is None else (*item, prompt)


def write_geojson(path: str, features: Iterable[tuple], crs, prompt_field: bool = False) -> int:
  """Streams RFC 7946 GeoJSON (EPSG:4326) to `path`; returns the number of features.

  `prompt_field`: the features are iter_features(..., prompt=...) 5-tuples, and each gets a
  `prompt` property.
  """
  n = 0
  with open(path, 'w') as f:
    f.write('{"type": "FeatureCollection", "features": [\n')
    for shape, value, area, area_px, *prompt in features:
      geom = rasterio.warp.transform_geom(crs, 'EPSG:4326', shapely.geometry.mapping(shape),
                                          precision=DECIMALS)
      # RFC 7946 section 3.1.6: exterior rings counter-clockwise, holes clockwise.
      geom = shapely.geometry.mapping(shapely.geometry.polygon.orient(
          shapely.geometry.shape(geom), 1.0))
      properties = {'value': value, 'area': area, 'area_px': area_px}
      if prompt_field:
        properties['prompt'] = prompt[0]
      feature = {'type': 'Feature', 'geometry': geom, 'properties': properties}
      f.write((',\n' if n else '') + json.dumps(feature))
      n += 1
    f.write('\n]}\n')
  return n


def write_ogr(path: str, features: Iterable[tuple], crs, driver: str = 'GPKG',
              prompt_field: bool = False) -> int:
  """Streams polygons in the raster CRS to an OGR `driver` file (GPKG, FlatGeobuf, ...);
  returns the number of features. `prompt_field`: as write_geojson, a string field `prompt`."""
  import pyogrio.raw  # pylint: disable=g-import-not-at-top
  crs_wkt = crs.to_wkt() if crs is not None else None
  n, chunk = 0, []

  def flush(first: bool) -> None:
    geoms = np.array([shapely.to_wkb(s) for s, *_ in chunk], dtype=object)
    fields = [np.array([c[1] for c in chunk], np.int32), np.array([c[2] for c in chunk]),
              np.array([c[3] for c in chunk], np.int64)]
    names = ['value', 'area', 'area_px']
    if prompt_field:
      fields.append(np.array([c[4] for c in chunk], dtype=object))
      names.append('prompt')
    pyogrio.raw.write(path, geoms, fields, names, driver=driver,
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
