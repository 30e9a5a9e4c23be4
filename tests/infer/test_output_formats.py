"""Output formats come from one table (inference/formats.py): a format registered there is what
the pipeline writes for its extension (the recipe "Adding an output format", followed here with
toy formats), and an unknown extension is refused in one error listing the known ones."""

from __future__ import annotations

import csv
import os

import numpy as np
import pyogrio.raw
import pytest
import rasterio

from segchange_jax.inference import formats
from segchange_jax.inference import pipeline
from tests.infer import scene_helpers as h

KW = dict(window=64, overlap=16, batch=4, progress=False)


def write_npy(src: str, dst: str, probabilities: bool) -> None:
  """Toy raster format: the finished scene's bands as a [C, H, W] .npy."""
  with rasterio.open(src) as ds:
    np.save(dst, ds.read())


def write_areas_csv(path: str, features, crs) -> int:
  """Toy vector format: one row per change polygon, its value and areas (no geometry)."""
  del crs
  n = 0
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['value', 'area', 'area_px'])
    for _, value, area, area_px in features:
      w.writerow([value, area, area_px])
      n += 1
  return n


@pytest.fixture
def toy_formats(monkeypatch):
  monkeypatch.setattr(formats, 'FORMATS', dict(formats.FORMATS))  # registered for this test only
  formats.register('.npy', formats.OutputFormat(formats.RASTER, 'NumPy array', write_npy))
  formats.register('.csv', formats.OutputFormat(formats.VECTOR, 'CSV of polygon areas',
                                                write_areas_csv))


@pytest.fixture
def pair(tmp_path):
  a, b = h.pair_arrays(150, 173)
  return h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)


def test_registered_formats_are_what_the_pipeline_writes(toy_formats, pair, tmp_path):
  a_path, b_path = pair
  ref = {n: str(tmp_path / n) for n in ('ref.tif', 'ref_p.tif', 'ref.gpkg')}
  pipeline.run_inference(a_path, b_path, ref['ref.tif'], h.box_change, probs_path=ref['ref_p.tif'],
                         polygons_path=ref['ref.gpkg'], **KW)
  toy = {n: str(tmp_path / n) for n in ('m.npy', 'p.npy', 'v.csv')}
  pipeline.run_inference(a_path, b_path, toy['m.npy'], h.box_change, probs_path=toy['p.npy'],
                         polygons_path=toy['v.csv'], **KW)
  with rasterio.open(ref['ref.tif']) as m, rasterio.open(ref['ref_p.tif']) as p:
    np.testing.assert_array_equal(np.load(toy['m.npy']), m.read())
    np.testing.assert_array_equal(np.load(toy['p.npy']), p.read())
  _, _, _, fields = pyogrio.raw.read(ref['ref.gpkg'])
  with open(toy['v.csv']) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(fields[0]) > 0
  assert sorted(int(r['area_px']) for r in rows) == sorted(int(x) for x in fields[2])
  assert not [n for n in os.listdir(tmp_path) if 'partial' in n]


def test_unknown_extension_is_one_error_listing_the_known(toy_formats, pair, tmp_path):
  a_path, b_path = pair
  with pytest.raises(formats.OutputFormatError) as e:
    pipeline.run_inference(a_path, b_path, str(tmp_path / 'o.xyz'), h.box_change, **KW)
  msg = str(e.value)
  assert "--out" in msg and "'.xyz'" in msg and '\n' not in msg
  for ext, fmt in formats.FORMATS.items():  # every raster format and only those
    assert (f'{ext} ({fmt.description}' in msg) == (fmt.kind == formats.RASTER), ext
  with pytest.raises(formats.OutputFormatError, match=r"--polygons .*'\.tif'.* \.csv \(CSV"):
    pipeline.run_inference(a_path, b_path, str(tmp_path / 'o.npy'), h.box_change,
                           polygons_path=str(tmp_path / 'v.tif'), **KW)
  with pytest.raises(formats.OutputFormatError, match=r"'\.csv'; use one of: \.tif"):
    pipeline.run_inference(a_path, b_path, str(tmp_path / 'o.csv'), h.box_change, **KW)
  assert sorted(os.listdir(tmp_path)) == ['a.tif', 'b.tif']


def test_format_properties_are_checked_from_the_table(toy_formats, pair, tmp_path):
  """A mask-only raster format refuses probabilities; one that drops georeferencing refuses
  georeferenced inputs; a vector format that needs a CRS refuses plain inputs."""
  a_path, b_path = pair
  formats.register('.bmpmask', formats.OutputFormat(formats.RASTER, 'toy mask', write_npy,
                                                    probabilities=False, georeferenced=False))
  with pytest.raises(formats.OutputFormatError, match='probabilities need a .tif / .tiff / .npy'):
    pipeline.run_inference(a_path, b_path, str(tmp_path / 'o.bmpmask'), h.box_change,
                           probabilities=True, **KW)
  with pytest.raises(formats.OutputFormatError, match='toy mask would drop the georeferencing'):
    pipeline.run_inference(a_path, b_path, str(tmp_path / 'o.bmpmask'), h.box_change, **KW)
  assert sorted(os.listdir(tmp_path)) == ['a.tif', 'b.tif']
