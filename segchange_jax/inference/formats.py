"""Output formats of `infer`: one table (FORMATS) of raster and vector writers, by extension.

- RASTER formats write `--out` and `--probability_out`. Their writer copies the finished scene,
  which the engine streamed into a scratch tiled GeoTIFF (uint8 mask with nodata
  `raster_io.MASK_NODATA`, or float32 probabilities with nodata NaN), to the output path:
  `write(src_tif, dst, probabilities)`.
- VECTOR formats write `--polygons`: `write(path, features, crs) -> count`, where features are
  `vectors.iter_features` tuples (shapely polygon in the raster CRS, value, area, area_px);
  for several prompts `write(path, features, crs, prompt_field=True)` with the prompt as a
  fifth item, written as a `prompt` attribute.

A new output format is one `register('.ext', OutputFormat(...))`, an entry of FORMATS; the
pipeline, its checks and its error messages read the table.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

from segchange_jax import atomic
from segchange_jax.inference import raster_io
from segchange_jax.inference import vectors

RASTER = 'raster'
VECTOR = 'vector'


class OutputFormatError(atomic.OutputError):
  """An output's extension or format does not fit; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class OutputFormat:
  """One output format: its kind (RASTER / VECTOR), name for messages and writer.

  `probabilities` (raster): the format holds float32 probabilities, not only a mask.
  `georeferenced` (raster): the format keeps the CRS and transform; one that drops them is
  refused for georeferenced inputs.
  `needs_crs` (vector): coordinates need a CRS (e.g. GeoJSON is WGS 84); refused for inputs
  without one.
  `multiband` (raster): the format holds one band per prompt; one that holds a single mask is
  refused for several prompts.
  """
  kind: str
  description: str
  write: Callable
  probabilities: bool = True
  georeferenced: bool = True
  needs_crs: bool = False
  multiband: bool = True


FORMATS: dict[str, OutputFormat] = {}


def register(ext: str, fmt: OutputFormat) -> None:
  """Adds (or replaces) the format of file extension `ext` ('.tif')."""
  if not ext.startswith('.') or fmt.kind not in (RASTER, VECTOR):
    raise ValueError(f'register({ext!r}, kind {fmt.kind!r}): give an extension with its dot '
                     f'and kind {RASTER!r} or {VECTOR!r}')
  FORMATS[ext.lower()] = fmt


_GEOTIFF = OutputFormat(RASTER, 'Cloud-Optimized GeoTIFF', raster_io.write_cog)
_GEOJSON = OutputFormat(VECTOR, 'GeoJSON, RFC 7946, WGS 84', vectors.write_geojson,
                        needs_crs=True)
register('.tif', _GEOTIFF)
register('.tiff', _GEOTIFF)
register('.png', OutputFormat(RASTER, 'PNG mask', raster_io.write_png, probabilities=False,
                              georeferenced=False, multiband=False))
register('.geojson', _GEOJSON)
register('.json', _GEOJSON)
register('.gpkg', OutputFormat(VECTOR, 'GeoPackage, raster CRS',
                               functools.partial(vectors.write_ogr, driver='GPKG')))
register('.fgb', OutputFormat(VECTOR, 'FlatGeobuf, raster CRS',
                              functools.partial(vectors.write_ogr, driver='FlatGeobuf')))


def _exts(kind: str, pick: Callable[[OutputFormat], bool] = lambda f: True) -> list[str]:
  return [e for e, f in FORMATS.items() if f.kind == kind and pick(f)]


def describe(kind: str) -> str:
  """The known `kind` formats as '.ext (description), ...' (flag help, error messages)."""
  return ', '.join(f'{e} ({FORMATS[e].description}'
                   f'{"" if FORMATS[e].georeferenced else ", inputs without a CRS only"})'
                   for e in _exts(kind))


def lookup(path: str, kind: str, flag: str) -> OutputFormat:
  """The `kind` format of `path`'s extension; an unknown one is refused, listing the known."""
  ext = os.path.splitext(path)[1].lower()
  fmt = FORMATS.get(ext)
  if fmt is None or fmt.kind != kind:
    raise OutputFormatError(f'{flag} {path}: unsupported {kind} format {ext!r}; use one of: '
                            f'{describe(kind)}')
  return fmt


def check_probabilities(fmt: OutputFormat, path: str, flag: str) -> None:
  """Refuses a raster format that holds a mask only as the destination of probabilities."""
  if not fmt.probabilities:
    raise OutputFormatError(f'{flag} {path}: probabilities need a '
                            f'{" / ".join(_exts(RASTER, lambda f: f.probabilities))} output '
                            f'({fmt.description} holds a mask only)')


def check_bands(fmt: OutputFormat, path: str, flag: str, prompts: int) -> None:
  """Refuses a single-mask raster format as the destination of `prompts` > 1 masks."""
  if prompts > 1 and not fmt.multiband:
    raise OutputFormatError(f'{flag} {path}: {fmt.description} holds one mask, but {prompts} '
                            f'prompts were given; use a '
                            f'{" / ".join(_exts(RASTER, lambda f: f.multiband))} output (one '
                            'band per prompt) or one --prompt per run')


def check_inputs(fmt: OutputFormat, path: str, flag: str, georeferenced: bool) -> None:
  """Refuses a format that cannot carry the inputs' georeferencing (or its lack of one)."""
  if fmt.kind == RASTER and georeferenced and not fmt.georeferenced:
    keep = ' / '.join(_exts(RASTER, lambda f: f.georeferenced))
    raise OutputFormatError(f'{flag} {path}: {fmt.description} would drop the georeferencing '
                            f'of the inputs; use a {keep} output')
  if fmt.kind == VECTOR and fmt.needs_crs and not georeferenced:
    other = ' or '.join(_exts(VECTOR, lambda f: not f.needs_crs))
    raise OutputFormatError(f'{flag} {path}: {fmt.description} needs georeferenced inputs; '
                            f'these have no CRS. Use {other} (pixel coordinates)')
