"""Every command line reports user errors in one line (naming the flag or file) with status 2.

The infer cases run in-process (its flags are defined on import); the other programs run as
subprocesses, all failing before jax is imported except the damaged-checkpoint case.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from segchange_jax import atomic
from segchange_jax import cli
from segchange_jax import infer
from segchange_jax.inference import pipeline
from segchange_jax.inference import raster_io
from segchange_jax.interop import checkpoints
from tests.eval import tiny
from tests.infer import scene_helpers as h

if 'checkpoint' not in flags.FLAGS:  # the command defines its flags only when run as one
  infer.define_flags()

REPO = tiny.REPO


def _one_line_error(stderr: str, *words: str) -> None:
  lines = [ln for ln in stderr.splitlines() if ln.strip()]
  assert lines and lines[-1].startswith('error: '), stderr[-2000:]
  assert 'Traceback' not in stderr, stderr[-2000:]
  errors = [ln for ln in lines if ln.startswith('error: ')]
  assert len(errors) == 1, stderr
  for w in words:
    assert w in errors[0], (w, errors[0])


def _subprocess(module: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture
def rasters(tmp_path):
  a, b = h.pair_arrays(200, 240)
  return h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)


def _run_infer(capsys, *args: str) -> str:
  """infer's main through cli.guard, as `python -m segchange_jax.infer` runs it; its stderr."""
  with flagsaver.flagsaver():
    flags.FLAGS(['infer', '--checkpoint', 'unused-ckpt', '--noprogress', *args])
    with pytest.raises(SystemExit) as e:
      cli.guard(infer.main)(['infer'])
  assert e.value.code == 2
  return capsys.readouterr().err


@pytest.mark.parametrize('extra, words', [
    (['--threshold', '2'], ['--threshold=2.0', 'between 0 and 1']),
    (['--batch', '0'], ['--batch=0', '>= 1']),
    (['--window', '100'], ['--window=100', 'multiple of 32']),
    (['--window', '64', '--overlap', '64'], ['--overlap=64', 'smaller than --window=64']),
    (['--bands', 'r,g,b'], ['--bands', 'integers']),
])
def test_infer_flag_values_checked_up_front(capsys, rasters, tmp_path, extra, words):
  err = _run_infer(capsys, '--a', rasters[0], '--b', rasters[1], '--out',
                   str(tmp_path / 'o.tif'), *extra)
  _one_line_error(err, *words)
  assert not (tmp_path / 'o.tif').exists()


def test_infer_never_overwrites_an_input(capsys, rasters, tmp_path):
  a_path, b_path = rasters
  before = pathlib.Path(a_path).read_bytes()
  _one_line_error(_run_infer(capsys, '--a', a_path, '--b', b_path, '--out', a_path),
                  '--out', 'is the input', a_path)
  link = tmp_path / 'link.tif'
  link.symlink_to(b_path)  # a symlink to an input is that input
  _one_line_error(_run_infer(capsys, '--a', a_path, '--b', b_path, '--out', str(link),
                             '--overwrite'), 'is the input', b_path)
  _one_line_error(_run_infer(capsys, '--a', a_path, '--b', b_path, '--out',
                             str(tmp_path / 'o.tif'), '--polygons', a_path, '--overwrite'),
                  '--polygons', 'is the input')
  assert pathlib.Path(a_path).read_bytes() == before and os.path.realpath(link) == b_path


def test_infer_existing_output_and_format_by_extension(capsys, rasters, tmp_path):
  a_path, b_path = rasters
  existing = tmp_path / 'old.tif'
  existing.write_bytes(b'precious')
  _one_line_error(_run_infer(capsys, '--a', a_path, '--b', b_path, '--out', str(existing)),
                  str(existing), 'already exists', '--overwrite')
  assert existing.read_bytes() == b'precious'
  _one_line_error(_run_infer(capsys, '--a', a_path, '--b', b_path, '--out',
                             str(tmp_path / 'x.jpg')), '--out', "'.jpg'", '.tif')
  # PNG would drop the georeferencing of GeoTIFF inputs.
  _one_line_error(_run_infer(capsys, '--a', a_path, '--b', b_path, '--out',
                             str(tmp_path / 'x.png')), '--out', 'georeferencing', '.tif')
  _one_line_error(_run_infer(capsys, '--a', a_path, '--b', b_path, '--out',
                             str(tmp_path / 'x.tif'), '--polygons', str(tmp_path / 'v.shp')),
                  '--polygons', "'.shp'", '.gpkg')
  assert sorted(os.listdir(tmp_path)) == ['a.tif', 'b.tif', 'old.tif']


def test_truncated_raster_names_the_file(capsys, tmp_path):
  a, b = h.pair_arrays(300, 300)
  a_path = h.write_tif(tmp_path / 'a.tif', a, tiled=True, blockxsize=64, blockysize=64)
  b_path = h.write_tif(tmp_path / 'b.tif', b, tiled=True, blockxsize=64, blockysize=64)
  data = pathlib.Path(b_path).read_bytes()
  pathlib.Path(b_path).write_bytes(data[:len(data) // 2])
  out = str(tmp_path / 'o.tif')
  with pytest.raises(raster_io.InputError, match='b.tif: cannot read pixels.*truncated'):
    pipeline.run_inference(a_path, b_path, out, h.box_change, window=64, overlap=16, batch=4,
                        progress=False)
  assert sorted(os.listdir(tmp_path)) == ['a.tif', 'b.tif']
  # Cut inside the header: refused when opened, in one line.
  pathlib.Path(b_path).write_bytes(data[:100])
  _one_line_error(_run_infer(capsys, '--a', a_path, '--b', b_path, '--out', out), 'b.tif',
                  'not a readable raster')


def test_window_larger_than_raster_is_clamped_with_a_warning(rasters, tmp_path, capsys):
  a_path, b_path = rasters
  small = str(tmp_path / 'w192.tif')
  stats = pipeline.run_inference(a_path, b_path, str(tmp_path / 'w512.tif'), h.box_change,
                              window=512, overlap=64, batch=2, probabilities=True,
                              progress=False)
  err = capsys.readouterr().err
  assert 'warning: --window 512 is larger than the 240x200 raster; using --window 192' in err
  assert stats.windows == 4  # 2 x 2 windows of 192 px over 200 x 240, no reflect padding
  pipeline.run_inference(a_path, b_path, small, h.box_change, window=192, overlap=48, batch=2,
                      probabilities=True, progress=False)
  with raster_io.rasterio.open(small) as x, raster_io.rasterio.open(tmp_path / 'w512.tif') as y:
    np.testing.assert_array_equal(x.read(), y.read())


def test_truncated_checkpoint_array_file(tmp_path):
  config = tiny.tiny_config()
  tiny.save_checkpoint(tmp_path / 'ckpt', config)
  files = [p for p in (tmp_path / 'ckpt' / 'variables').rglob('*') if p.is_file()
           and p.stat().st_size > 10000]
  assert files
  for p in files:  # cut every array data file in half
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  with pytest.raises(checkpoints.CheckpointError, match='cannot be read.*incomplete or corrupt'):
    checkpoints.load_variables(str(tmp_path / 'ckpt'))
  proc = _subprocess('segchange_jax.evaluate', '--checkpoint', str(tmp_path / 'ckpt'),
                     '--out', str(tmp_path / 'ev'))
  assert proc.returncode == 2, proc.stderr[-3000:]
  _one_line_error(proc.stderr, str(tmp_path / 'ckpt'), 'incomplete or corrupt')


@pytest.mark.parametrize('args, words', [
    (['--config', 'configs/demo.py', '--config.train.batchsize=3'],
     ['--config.train.batchsize=3', "'batch_size'"]),
    (['--config', 'configs/demo.py', '--config.train.batch_size=0'],
     ['config.train.batch_size=0', '>= 1']),
    (['--config', 'configs/nope.py'], ['--config configs/nope.py', 'does not exist']),
    ([], ['--config']),
])
def test_train_config_errors(tmp_path, args, words):
  proc = _subprocess('segchange_jax.train', '--workdir', str(tmp_path / 'w'), *args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  _one_line_error(proc.stderr, *words)
  assert not (tmp_path / 'w').exists()


def test_train_workdir_that_is_a_file_is_refused_and_kept(tmp_path):
  target = tmp_path / 'notes.txt'
  target.write_text('user data')
  for workdir in (target, target / 'run'):
    proc = _subprocess('segchange_jax.train', '--config', 'configs/demo.py', '--workdir',
                       str(workdir))
    assert proc.returncode == 2, proc.stderr[-3000:]
    _one_line_error(proc.stderr, f"--workdir='{workdir}'", f'{target} is a file')
  assert target.read_text() == 'user data'


def test_other_programs(tmp_path):
  bad_pth = tmp_path / 'notes.pth'
  bad_pth.write_text('not a checkpoint')
  proc = _subprocess('segchange_jax.convert_torch', '--checkpoint', str(bad_pth), '--config',
                     'configs/demo.py', '--out', str(tmp_path / 'conv'))
  assert proc.returncode == 2
  _one_line_error(proc.stderr, str(bad_pth), 'torch')
  proc = _subprocess('segchange_jax.convert_torch', '--checkpoint', str(bad_pth), '--config',
                     'configs/demo.py', '--out', str(bad_pth), '--overwrite')
  assert proc.returncode == 2
  _one_line_error(proc.stderr, '--out', 'is the input')
  proc = _subprocess('segchange_jax.convert_torch', '--reverse', '--checkpoint', str(tmp_path),
                     '--out', str(tmp_path / 'back.pth'))
  assert proc.returncode == 2
  _one_line_error(proc.stderr, '--out', '.safetensors')
  proc = _subprocess('segchange_jax.embed_prompts', '--text_model', 'pkg:x', '--prompts',
                     str(tmp_path / 'missing.txt'), '--out', str(tmp_path / 'e.npz'))
  assert proc.returncode == 2
  _one_line_error(proc.stderr, '--prompts', 'missing.txt', 'does not exist')
  proc = _subprocess('segchange_jax.embed_prompts', '--text_model', 'pkg:x')
  assert proc.returncode == 2
  _one_line_error(proc.stderr, '--prompts', '--out')
  proc = _subprocess('data_prep.convert', '--layout', 'opencd', '--root', str(tmp_path),
                     '--out', str(tmp_path / 'o'), '--splits', 'train')
  assert proc.returncode == 2
  _one_line_error(proc.stderr)


def test_atomic_helpers(tmp_path):
  target = tmp_path / 'f.txt'
  with pytest.raises(RuntimeError):
    with atomic.atomic_open(str(target)) as f:
      f.write('half')
      raise RuntimeError('crash')
  assert os.listdir(tmp_path) == []
  with atomic.atomic_open(str(target)) as f:
    f.write('whole')
  assert target.read_text() == 'whole' and os.listdir(tmp_path) == ['f.txt']
  folder = tmp_path / 'bundle'
  for text in ('one', 'two'):
    with atomic.atomic_dir(str(folder)) as d:
      pathlib.Path(d, 'x').write_text(text)
  assert (folder / 'x').read_text() == 'two' and sorted(os.listdir(tmp_path)) == ['bundle', 'f.txt']
  hard = tmp_path / 'hard.txt'
  os.link(target, hard)
  with pytest.raises(atomic.OutputError, match='is the input'):
    atomic.check_output(str(hard), [str(target)], overwrite=True)
  with pytest.raises(atomic.OutputError, match='both name'):
    atomic.check_distinct({'--out': str(target), '--preview': str(tmp_path / '.' / 'f.txt')})
  shutil.rmtree(folder)
