r"""Makes a "date B" raster for a change-detection demo: a copy of A with one patch pasted in.

  python docs/make_pasted_change.py ../shared/data/geotiff/RGB.byte.tif /tmp/rgb_b.tif

Copies the block A[src_row:src_row+size, src_col:src_col+size] (all bands) onto
[dst_row:dst_row+size, dst_col:dst_col+size] and writes B with A's profile (CRS, transform,
nodata, dtype), so A and B share one pixel grid and the only change is the pasted box. The
defaults paste a land-and-cloud patch of RGB.byte.tif into the open sea east of the island.
Prints the pasted box in pixels and in map coordinates.
"""

from __future__ import annotations

import argparse

import numpy as np
import rasterio


def paste(src_path: str, dst_path: str, src_rc: tuple[int, int], dst_rc: tuple[int, int],
          size: int) -> tuple[int, int, int, int]:
  """Writes the pasted copy; returns the changed box (row0, row1, col0, col1)."""
  with rasterio.open(src_path) as src:
    arr = src.read()
    profile = src.profile
    colorinterp = src.colorinterp
    transform = src.transform
  _, h, w = arr.shape
  (sr, sc), (dr, dc) = src_rc, dst_rc
  for name, (r, c) in (('source', src_rc), ('destination', dst_rc)):
    if not (0 <= r and r + size <= h and 0 <= c and c + size <= w):
      raise SystemExit(f'{name} box ({r}, {c}) + {size} px leaves the {h}x{w} raster {src_path}')
  out = arr.copy()
  out[:, dr:dr + size, dc:dc + size] = arr[:, sr:sr + size, sc:sc + size]
  # Strip-organised sources (RGB.byte.tif: 3-row strips) would copy odd block sizes; let
  # GDAL choose the layout of the copy.
  for key in ('blockxsize', 'blockysize', 'tiled'):
    profile.pop(key, None)
  with rasterio.open(dst_path, 'w', **profile) as ds:
    ds.write(out)
  with rasterio.open(dst_path, 'r+') as ds:
    ds.colorinterp = colorinterp  # else GDAL may call a 4th uint8 band alpha
  x0, y0 = transform * (dc, dr)
  x1, y1 = transform * (dc + size, dr + size)
  print(f'wrote {dst_path}: pasted rows {sr}:{sr + size}, cols {sc}:{sc + size} onto rows '
        f'{dr}:{dr + size}, cols {dc}:{dc + size} (map x {x0:.0f}..{x1:.0f}, '
        f'y {y1:.0f}..{y0:.0f}); {int(np.any(out != arr, axis=0).sum())} pixels differ')
  return dr, dr + size, dc, dc + size


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('src', help='date A raster')
  p.add_argument('dst', help='output date B raster')
  p.add_argument('--src_rc', type=int, nargs=2, default=(250, 220), metavar=('ROW', 'COL'))
  p.add_argument('--dst_rc', type=int, nargs=2, default=(420, 500), metavar=('ROW', 'COL'))
  p.add_argument('--size', type=int, default=120)
  args = p.parse_args()
  paste(args.src, args.dst, tuple(args.src_rc), tuple(args.dst_rc), args.size)


if __name__ == '__main__':
  main()
