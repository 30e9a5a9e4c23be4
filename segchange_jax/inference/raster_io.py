"""Scene inputs and outputs of `segchange_jax.inference.sliding_window`: GeoTIFF (windowed) and
plain images.

Inputs. One date is a raster path, or three single-band rasters 'R.TIF,G.TIF,B.TIF' stacked in
that order (e.g. Landsat B4,B3,B2 files; `bands=` then applies only to a single-file date);
bands and bit depth follow `segchange_jax.data.imagery`
(16-bit: per-band 2-98 % stretch with statistics from a decimated read of the whole raster,
so every window uses the same mapping). Validity follows GDAL's dataset mask (nodata value,
alpha band or internal mask; for a stack, valid where any file is valid); `nodata=` overrides
files that carry no nodata tag (Landsat L1 fills with 0 but does not say so).
B must be on A's grid (CRS, transform, shape); `align=True` reprojects B onto A's grid
(bilinear, rasterio WarpedVRT), and pixels outside B's footprint become nodata.
PNG/JPEG pairs (no georeferencing) are read whole: they are small by nature.

Outputs: rows stream into a scratch tiled GeoTIFF (`GeoTiffSink`), which the output format's
writer (inference/formats.py) copies once the scene is finished: `write_cog` into a
Cloud-Optimized GeoTIFF (internal 256 px tiles, overviews, deflate; mask outputs carry a colour
table), `write_png` into a PNG mask. Naming and renaming: segchange_jax.atomic. Several prompts
answered in one pass give one mask band per prompt (`GeoTiffSink(prompts=...)`, `encode(groups=)`),
each described by its prompt.
"""

from __future__ import annotations

import os
from typing import Sequence
import warnings

import numpy as np
import rasterio
from rasterio.enums import Resampling
import rasterio.errors
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from segchange_jax.data import imagery

PLAIN_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp')
STATS_MAX_SIDE = 1024  # decimated read for the 16-bit stretch statistics
MASK_NODATA = 255      # uint8 mask output: 0 no change, 1 change (or class id), 255 nodata


class GridMismatchError(ValueError):
  """A and B are not on one pixel grid."""


class InputError(ValueError):
  """An input raster cannot be read; the message names the file."""


# Mask colours: no change transparent black, change red, nodata fully transparent; class ids of
# multi-class models get distinct colours.
MASK_COLORS = {0: (0, 0, 0, 0), 1: (255, 0, 0, 255), 2: (0, 160, 255, 255),
               3: (255, 200, 0, 255), 4: (0, 200, 80, 255), 5: (200, 0, 255, 255),
               MASK_NODATA: (0, 0, 0, 0)}


def _first(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def is_plain(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in PLAIN_SUFFIXES


def _grid_of(ds) -> tuple:
  return ds.crs, ds.transform, ds.height, ds.width


def _same_grid(g1: tuple, g2: tuple) -> bool:
  crs1, t1, h1, w1 = g1
  crs2, t2, h2, w2 = g2
  tol = 1e-6 * max(abs(t1.a), abs(t1.e), 1e-12)
  return crs1 == crs2 and (h1, w1) == (h2, w2) and t1.almost_equals(t2, precision=tol)


def _describe(name: str, g: tuple) -> str:
  crs, t, h, w = g
  return f'{name}: {w}x{h} px, CRS {crs}, origin ({t.c:.3f}, {t.f:.3f}), pixel {t.a:g}x{t.e:g}'


class RasterDate:
  """One date on a pixel grid, read window by window as uint8 RGB plus validity."""

  def __init__(self, spec: str, bands: Sequence[int] | None = None, nodata: float | None = None,
               reference=None):
    self.spec = spec
    self.paths = [p.strip() for p in spec.split(',') if p.strip()]
    for p in self.paths:
      if not os.path.exists(p):
        raise FileNotFoundError(f'{p}: input raster not found')
    self.nodata = nodata
    self._raw = []
    for p in self.paths:
      try:
        self._raw.append(rasterio.open(p))
      except rasterio.errors.RasterioError as e:
        for ds in self._raw:
          ds.close()
        raise InputError(f'{p}: not a readable raster ({_first(e)}); give a GeoTIFF or other '
                         'GDAL raster') from e
    if len(self.paths) == 1:
      src = self._raw[0]
      self.indexes = [imagery.select_bands(src.count, bands, self.paths[0])]
    else:
      # A stack is already R, G, B: `bands` is meant for the other (single-file) date.
      if len(self.paths) != 3:
        raise imagery.ImageryError(f'{spec}: a stack is exactly three single-band files R,G,B '
                                   '(in that order)')
      for p, ds in zip(self.paths, self._raw):
        if ds.count != 1:
          raise imagery.ImageryError(f'{p} has {ds.count} bands; stacks take single-band files')
        if not _same_grid(_grid_of(ds), _grid_of(self._raw[0])):
          raise GridMismatchError(f'stack {spec}: {p} is not on the grid of {self.paths[0]}')
      self.indexes = [[1]] * 3
    self.grid = _grid_of(self._raw[0])
    self.datasets = self._raw
    if reference is not None:
      self.datasets = [self._warp(ds, reference) for ds in self._raw]
      self.grid = reference
    self.dtype = self._raw[0].dtypes[0]
    self.stats = None if self.dtype == 'uint8' else self._stretch_stats()

  def _warp(self, ds, reference: tuple) -> WarpedVRT:
    crs, transform, height, width = reference
    kw = dict(crs=crs, transform=transform, height=height, width=width,
              resampling=Resampling.bilinear)
    if self.nodata is not None:
      kw.update(src_nodata=self.nodata, nodata=self.nodata)
    elif ds.nodata is None:
      kw.update(add_alpha=True)  # marks pixels outside the source footprint
    return WarpedVRT(ds, **kw)

  def _read(self, window: Window | None, out_shape=None) -> tuple[np.ndarray, np.ndarray]:
    arrays, masks = [], []
    for ds, idx in zip(self.datasets, self.indexes):
      shape = None if out_shape is None else (len(idx),) + out_shape
      arrays.append(ds.read(idx, window=window, out_shape=shape, resampling=Resampling.nearest))
      if self.nodata is None:
        masks.append(ds.dataset_mask(window=window, out_shape=out_shape,
                                     resampling=Resampling.nearest) > 0)
    arr = np.concatenate(arrays).transpose(1, 2, 0)
    if self.nodata is not None:
      valid = ~np.all(arr == self.nodata, axis=-1)
    else:
      valid = np.logical_or.reduce(masks)
    return arr, valid

  def _stretch_stats(self) -> np.ndarray:
    _, _, h, w = self.grid
    scale = max(1.0, max(h, w) / STATS_MAX_SIDE)
    arr, valid = self._read(None, (max(1, round(h / scale)), max(1, round(w / scale))))
    return imagery.stretch_stats(arr, valid)

  def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    try:
      arr, valid = self._read(Window(x, y, w, h))
    except rasterio.errors.RasterioError as e:
      raise InputError(f'{self.spec}: cannot read pixels at row {y}, column {x} ({_first(e)}); '
                       'the file is truncated or corrupt: copy it again') from e
    return imagery.to_uint8(arr, self.stats), valid

  def overview(self, out_shape: tuple[int, int]) -> np.ndarray:
    """The whole date as uint8 RGB resampled to `out_shape` (for previews)."""
    arr, _ = self._read(None, out_shape)
    return imagery.to_uint8(arr, self.stats)

  def close(self) -> None:
    for ds in self.datasets + self._raw:
      ds.close()


class RasterPair:
  """A and B GeoTIFF dates on A's grid (the engine's PairSource)."""

  def __init__(self, a: str, b: str, bands: Sequence[int] | None = None,
               nodata: float | None = None, align: bool = False):
    self.a = RasterDate(a, bands, nodata)
    b_raw = RasterDate(b, bands, nodata)
    if _same_grid(self.a.grid, b_raw.grid):
      self.b = b_raw
    elif not align:
      msg = ('A and B are on different pixel grids:\n  ' + _describe(a, self.a.grid) + '\n  '
             + _describe(b, b_raw.grid) + '\nPass --align to reproject B onto A\'s grid '
             '(bilinear; pixels outside B become nodata).')
      b_raw.close()
      self.a.close()
      raise GridMismatchError(msg)
    else:
      b_raw.close()
      self.b = RasterDate(b, bands, nodata, reference=self.a.grid)
    self.crs, self.transform, self.height, self.width = self.a.grid

  @property
  def georeferenced(self) -> bool:
    return self.crs is not None

  @property
  def paths(self) -> list[str]:
    return self.a.paths + self.b.paths

  def read(self, y: int, x: int, h: int, w: int):
    a, va = self.a.read(y, x, h, w)
    b, vb = self.b.read(y, x, h, w)
    return a, b, va & vb

  def overview(self, out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return self.a.overview(out_shape), self.b.overview(out_shape)

  def close(self) -> None:
    self.a.close()
    self.b.close()


def read_plain(path: str) -> tuple[np.ndarray, np.ndarray]:
  """PNG/JPEG -> (RGB uint8 [H, W, 3], valid [H, W]); alpha 0 marks nodata."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: input image not found')
  try:
    with Image.open(path) as im:
      if im.mode in ('L', 'I', 'I;16', 'F'):
        raise imagery.ImageryError(f'{path} is single-band ({im.mode}); the model needs RGB')
      rgba = np.asarray(im.convert('RGBA'))
  except OSError as e:
    raise InputError(f'{path}: cannot read the image ({_first(e)}); the file is truncated or '
                     'not an image') from e
  return rgba[..., :3].copy(), rgba[..., 3] > 0


class ArrayPair:
  """A and B held in memory (plain images or arrays); the engine's PairSource."""
  crs = None
  transform = None
  georeferenced = False

  def __init__(self, a, b):
    """`a`, `b`: PNG/JPEG paths, or uint8 [H, W, 3] arrays (all pixels valid)."""
    self.paths = [p for p in (a, b) if isinstance(p, (str, os.PathLike))]
    self.a, va = read_plain(a) if isinstance(a, (str, os.PathLike)) else _as_rgb(a, 'a')
    self.b, vb = read_plain(b) if isinstance(b, (str, os.PathLike)) else _as_rgb(b, 'b')
    if self.a.shape != self.b.shape:
      raise GridMismatchError(f'{_name(a)} is {self.a.shape[1]}x{self.a.shape[0]} px but '
                              f'{_name(b)} is {self.b.shape[1]}x{self.b.shape[0]} px; the two '
                              'images must have one size')
    self.valid = va & vb
    self.height, self.width = self.a.shape[:2]

  def read(self, y: int, x: int, h: int, w: int):
    s = np.s_[y:y + h, x:x + w]
    return self.a[s].copy(), self.b[s].copy(), self.valid[s].copy()

  def overview(self, out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    import cv2  # pylint: disable=g-import-not-at-top
    size = (out_shape[1], out_shape[0])
    return (cv2.resize(self.a, size, interpolation=cv2.INTER_AREA),
            cv2.resize(self.b, size, interpolation=cv2.INTER_AREA))

  def close(self) -> None:
    pass


def _name(x) -> str:
  return os.fspath(x) if isinstance(x, (str, os.PathLike)) else f'array {getattr(x, "shape", "")}'


def _as_rgb(x, name: str) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x)
  if x.ndim != 3 or x.shape[-1] != 3 or x.dtype != np.uint8:
    raise imagery.ImageryError(f'image {name}: expected a uint8 [H, W, 3] RGB array, got '
                               f'{x.dtype} {list(x.shape)}')
  return np.ascontiguousarray(x), np.ones(x.shape[:2], bool)


def encode(probs: np.ndarray, valid: np.ndarray, probabilities: bool,
           threshold: float, groups: int = 1) -> np.ndarray:
  """Finished rows -> output values [C or groups, rows, W] (mask uint8 or float32
  probabilities).

  `groups` > 1: the C channels are `groups` prompts of C / groups channels each (prompt-major,
  pipeline.prompt_logits_to_probs), and the mask has one band per prompt.
  """
  if groups > 1 and not probabilities:
    per = np.split(probs, groups, axis=-1)
    return np.concatenate([encode(p, valid, False, threshold) for p in per])
  if probabilities:
    out = np.where(valid[..., None], probs, np.nan).astype(np.float32)
    return out.transpose(2, 0, 1)
  if probs.shape[-1] == 1:
    mask = (probs[..., 0] > threshold).astype(np.uint8)
  else:
    mask = probs.argmax(-1).astype(np.uint8)
  return np.where(valid, mask, MASK_NODATA)[None]


def band_names(prompts: Sequence[str], channels: int, probabilities: bool) -> list[str]:
  """Band descriptions of a P-prompt raster: the prompt of each mask band, or of each
  probability band ('<prompt> (class k)' when every prompt has K > 1 class channels)."""
  if not probabilities or channels == len(prompts):
    return list(prompts)
  k = channels // len(prompts)
  return [f'{p} (class {c})' for p in prompts for c in range(k)]


class GeoTiffSink:
  """Streams rows into a tiled, deflate-compressed scratch GeoTIFF at `path`.

  `write_cog` then turns it into the final Cloud-Optimized GeoTIFF (GDAL's COG driver copies a
  finished raster; it cannot be written row by row). `prompts` (several prompts answered in
  one pass, `channels` = P x K prompt-major): one mask band per prompt (or the P x K
  probability bands), each described by its prompt (band description and band tag PROMPT,
  which the COG copy keeps).
  """
  block_rows = 256

  def __init__(self, path: str, height: int, width: int, crs, transform, channels: int,
               probabilities: bool, threshold: float, tags: dict | None = None,
               prompts: Sequence[str] | None = None):
    self.path = self.partial = path
    self.probabilities, self.threshold = probabilities, threshold
    self.groups = len(prompts) if prompts else 1
    if channels % self.groups:
      raise ValueError(f'{channels} probability channels do not split into {self.groups} '
                       'prompts')
    profile = dict(driver='GTiff', height=height, width=width, tiled=True, blockxsize=256,
                   blockysize=256, compress='deflate', crs=crs, transform=transform)
    if probabilities:
      profile.update(count=channels, dtype='float32', nodata=float('nan'), predictor=3)
    else:
      profile.update(count=self.groups, dtype='uint8', nodata=MASK_NODATA)
    with warnings.catch_warnings():
      if transform is None:  # plain inputs: a scratch without georeferencing on purpose
        profile.pop('transform')
        warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
      self.ds = rasterio.open(path, 'w', **profile)
    if not probabilities and self.groups <= 2:
      # GeoTIFF keeps a colour table for the first band only, and GDAL writes none for files
      # of 3+ samples: masks of 3+ prompts have none (their bands are named by prompt).
      self.ds.write_colormap(1, MASK_COLORS)
    if tags:
      self.ds.update_tags(**{k: str(v) for k, v in tags.items()})
    if prompts:
      for i, name in enumerate(band_names(prompts, profile['count'], probabilities)):
        self.ds.set_band_description(i + 1, name)
        self.ds.update_tags(i + 1, PROMPT=prompts[i * len(prompts) // profile['count']])

  def write(self, row0: int, probs: np.ndarray, valid: np.ndarray) -> None:
    out = encode(probs, valid, self.probabilities, self.threshold, self.groups)
    self.ds.write(out, window=Window(0, row0, out.shape[2], out.shape[1]))

  def close(self) -> None:
    if not self.ds.closed:
      self.ds.close()


class TeeSink:
  """Hands the same rows to several sinks (mask and probability rasters)."""

  def __init__(self, sinks):
    self.sinks = list(sinks)
    self.block_rows = max(s.block_rows for s in self.sinks)

  def write(self, row0: int, probs: np.ndarray, valid: np.ndarray) -> None:
    for s in self.sinks:
      s.write(row0, probs, valid)


def write_cog(src: str, dst: str, probabilities: bool) -> None:
  """Copies the scratch GeoTIFF `src` to a Cloud-Optimized GeoTIFF `dst`.

  256 px internal tiles, deflate, overviews down to one tile (nearest for class masks so
  overview pixels stay class ids, average for probabilities); tags and the colour table are
  carried over.
  """
  from rasterio import shutil as rio_shutil  # pylint: disable=g-import-not-at-top
  options = dict(BLOCKSIZE=256, COMPRESS='DEFLATE', OVERVIEWS='AUTO',
                 RESAMPLING='AVERAGE' if probabilities else 'NEAREST')
  if probabilities:
    options['PREDICTOR'] = 'YES'
  rio_shutil.copy(src, dst, driver='COG', **options)


class PlainSink:
  """Collects a mask in memory and saves it as PNG (0 no change, 255 change and nodata 0)."""
  block_rows = 1

  def __init__(self, path: str, height: int, width: int, threshold: float):
    self.path = self.partial = path
    self.threshold = threshold
    self.mask = np.zeros((height, width), np.uint8)
    self.saved = False

  def write(self, row0: int, probs: np.ndarray, valid: np.ndarray) -> None:
    m = encode(probs, valid, False, self.threshold)[0]
    self.mask[row0:row0 + m.shape[0]] = np.where(m == MASK_NODATA, 0, m)

  def close(self) -> None:
    if not self.saved:
      save_png_mask(self.path, self.mask)
      self.saved = True


def save_png_mask(path: str, mask: np.ndarray) -> None:
  """A uint8 mask (nodata already 0) as PNG: binary masks as 0/255 so they are visible, class
  ids as they are."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scale = 255 if mask.max() <= 1 else 1
  Image.fromarray(mask * scale).save(path, format='PNG')


def write_png(src: str, dst: str, probabilities: bool = False) -> None:
  """Copies the scratch mask GeoTIFF `src` to a PNG `dst` (nodata written as 0); the
  georeferencing is dropped, so it is for inputs without any."""
  if probabilities:
    raise ValueError(f'{dst}: a PNG holds a mask, not probabilities')
  with warnings.catch_warnings():  # plain inputs: the scratch has no geotransform on purpose
    warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
    with rasterio.open(src) as ds:
      mask = ds.read(1)
  save_png_mask(dst, np.where(mask == MASK_NODATA, 0, mask).astype(np.uint8))
