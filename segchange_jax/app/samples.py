"""The sample pairs bundled with the app (synthetic scenes, so they carry no licence question).

    python -m segchange_jax.app.samples   # regenerates segchange_jax/app/sample_data/

Scenes come from data_prep.synthetic with seed 7 (the demo trains on seed 0, so these are
unseen scenes of the same kind): two 128 px PNG pairs and one 256 px GeoTIFF pair made of four
128 px scenes (2 x 2), georeferenced in UTM 18N (EPSG:32618) with 0.5 m pixels so the app can
show the changed area in m^2 / ha. Regenerating gives the same pixels (tests/app/test_ui.py).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

DATA_DIR = pathlib.Path(__file__).resolve().parent / 'sample_data'
SEED = 7
SIZE = 128
GEO_SCENES = ((3, 5), (7, 0))  # 2 x 2 mosaic of scene indices for the GeoTIFF pair
GEO_CRS = 'EPSG:32618'
GEO_ORIGIN = (500000.0, 4000000.0)
GEO_PIXEL = 0.5  # metres


@dataclasses.dataclass(frozen=True)
class Sample:
  """A bundled pair: the name shown in the app and the A / B files under DATA_DIR."""
  name: str
  a: str
  b: str

  @property
  def paths(self) -> tuple[str, str]:
    return str(DATA_DIR / self.a), str(DATA_DIR / self.b)


SAMPLES = (  # the first is the page's default
    Sample('Synthetic 256 px GeoTIFF, UTM 18N, 0.5 m', 'geo_A.tif', 'geo_B.tif'),
    Sample('Synthetic buildings, 128 px PNG', 'buildings_A.png', 'buildings_B.png'),
    Sample('Synthetic buildings, roads, mounds, 128 px PNG', 'mixed_A.png', 'mixed_B.png'),
)
PNG_SCENES = {'buildings': 1, 'mixed': 2}


def by_name(name: str) -> Sample:
  for s in SAMPLES:
    if s.name == name:
      return s
  raise ValueError(f'unknown sample {name!r}; choose one of {[s.name for s in SAMPLES]}')


def scene_pair(index: int) -> tuple[np.ndarray, np.ndarray]:
  """(A, B) uint8 RGB [SIZE, SIZE, 3] of synthetic scene `index` (seed SEED)."""
  from segchange_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  a, b, _, _ = synthetic.make_scene(SEED, index, SIZE)
  return a, b


def geo_pair() -> tuple[np.ndarray, np.ndarray]:
  """(A, B) of the 2 x 2 mosaic GEO_SCENES, uint8 RGB [2 SIZE, 2 SIZE, 3]."""
  rows = [[scene_pair(i) for i in row] for row in GEO_SCENES]
  return tuple(np.concatenate([np.concatenate([p[k] for p in row], axis=1) for row in rows],
                              axis=0) for k in (0, 1))


def write_all(out: pathlib.Path = DATA_DIR) -> None:
  """Writes every sample's files into `out`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.transform import from_origin  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  for stem, index in PNG_SCENES.items():
    for name, img in zip('AB', scene_pair(index)):
      Image.fromarray(img).save(out / f'{stem}_{name}.png', optimize=True)
  transform = from_origin(*GEO_ORIGIN, GEO_PIXEL, GEO_PIXEL)
  for name, img in zip('AB', geo_pair()):
    with rasterio.open(out / f'geo_{name}.tif', 'w', driver='GTiff', width=img.shape[1],
                       height=img.shape[0], count=3, dtype='uint8', crs=GEO_CRS,
                       transform=transform, compress='deflate', photometric='RGB') as ds:
      ds.write(img.transpose(2, 0, 1))


if __name__ == '__main__':
  write_all()
  print(f'wrote {sorted(os.listdir(DATA_DIR))} to {DATA_DIR}')
