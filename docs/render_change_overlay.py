r"""Renders a predicted change mask over the date-B raster as a small PNG (for docs/images).

  python docs/render_change_overlay.py B.tif change.tif out.png [--box R0 R1 C0 C1] [--width 360]

Predicted change (mask value 1..254) is tinted red and outlined; mask nodata (255) is left as
is; `--box` (e.g. the box printed by docs/make_pasted_change.py) is drawn in yellow. The picture
is downscaled to --width pixels (area interpolation) so that it stays small.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import rasterio

NODATA = 255


def render(b_path: str, mask_path: str, out_path: str, box=None, width: int = 360) -> dict:
  with rasterio.open(b_path) as ds:
    rgb = np.transpose(ds.read((1, 2, 3)), (1, 2, 0))
  with rasterio.open(mask_path) as ds:
    mask = ds.read(1)
  if mask.shape != rgb.shape[:2]:
    raise SystemExit(f'{mask_path} is {mask.shape}, {b_path} is {rgb.shape[:2]}: not one grid')
  if rgb.dtype != np.uint8:  # 16-bit: 2-98 % stretch for display
    lo, hi = np.percentile(rgb[rgb > 0], (2, 98))
    rgb = np.clip((rgb.astype(np.float32) - lo) / max(hi - lo, 1) * 255, 0, 255).astype(np.uint8)
  change = (mask > 0) & (mask != NODATA)
  out = rgb.astype(np.float32)
  out[change] = 0.45 * out[change] + 0.55 * np.array([255, 0, 0], np.float32)
  out = np.ascontiguousarray(out.astype(np.uint8)[..., ::-1])  # BGR for OpenCV
  contours, _ = cv2.findContours(change.astype(np.uint8), cv2.RETR_EXTERNAL,
                                 cv2.CHAIN_APPROX_SIMPLE)
  cv2.drawContours(out, contours, -1, (0, 0, 255), 2)
  if box is not None:
    r0, r1, c0, c1 = box
    cv2.rectangle(out, (c0, r0), (c1 - 1, r1 - 1), (0, 255, 255), 2)
  h, w = out.shape[:2]
  if w > width:
    out = cv2.resize(out, (width, round(h * width / w)), interpolation=cv2.INTER_AREA)
  if not cv2.imwrite(out_path, out, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
    raise SystemExit(f'could not write {out_path}')
  stats = {'change_px': int(change.sum()), 'nodata_px': int((mask == NODATA).sum())}
  if box is not None:
    r0, r1, c0, c1 = box
    stats['change_px_in_box'] = int(change[r0:r1, c0:c1].sum())
    stats['box_px'] = (r1 - r0) * (c1 - c0)
  print(f'wrote {out_path}: {stats}')
  return stats


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('b', help='date B raster (RGB or R,G,B bands 1-3)')
  p.add_argument('mask', help='mask GeoTIFF written by segchange_jax.infer')
  p.add_argument('out', help='output PNG')
  p.add_argument('--box', type=int, nargs=4, metavar=('R0', 'R1', 'C0', 'C1'))
  p.add_argument('--width', type=int, default=360)
  args = p.parse_args()
  render(args.b, args.mask, args.out, args.box, args.width)


if __name__ == '__main__':
  main()
