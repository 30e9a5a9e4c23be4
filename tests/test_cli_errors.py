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
import numpy as np
import pytest

from segchange_jax import atomic
from segchange_jax import infer
from segchange_jax.inference import pipeline
from segchange_jax.inference import raster_io
from segchange_jax.interop import checkpoints
from tests.eval import test_evaluate_tta
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


_run_infer = h.run_infer_cli


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


def test_infer_text_model_package_not_installed(tmp_path):
  """A checkpoint whose config names a pkg: text model that is not installed: the advice in one
  line (it was the last line of an 18-frame ModuleNotFoundError traceback)."""
  config = tiny.tiny_config()
  with config.unlocked():
    config.text.model = 'pkg:not_installed_pkg'
  tiny.save_checkpoint(tmp_path / 'ckpt', config)
  a, b = h.pair_arrays(64, 64)
  a_path, b_path = h.write_tif(tmp_path / 'a.tif', a), h.write_tif(tmp_path / 'b.tif', b)
  proc = _subprocess('segchange_jax.infer', '--checkpoint', str(tmp_path / 'ckpt'), '--a',
                     a_path, '--b', b_path, '--out', str(tmp_path / 'o.tif'), '--noprogress')
  assert proc.returncode == 2, proc.stderr[-3000:]
  _one_line_error(proc.stderr, "'pkg:not_installed_pkg'", 'is not installed',
                  'pip install --no-deps not-installed-pkg', '--embeddings')
  assert sorted(os.listdir(tmp_path)) == ['a.tif', 'b.tif', 'ckpt']


def test_export_bundle_prompt_outside_its_table_in_infer_onnxruntime(capsys, rasters, tmp_path):
  """infer --backend onnxruntime on a bundle's model.onnx (uint8 images, prompt index) with a
  prompt outside its table and no model_embeddings.onnx beside it: one line naming the table
  and the fix, nothing written. (A stand-in graph with the bundle's inputs, outputs and
  metadata: what the backend reads before running anything.)"""
  import onnx  # pylint: disable=g-import-not-at-top

  from segchange_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  mk = onnx.helper.make_tensor_value_info
  u8, f32, i32 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
  graph = onnx.helper.make_graph(
      [onnx.helper.make_node('Cast', ['image_a'], ['probabilities'], to=f32),
       onnx.helper.make_node('Identity', ['image_b'], ['mask'])], 'stand_in',
      [mk('image_a', u8, ['b', 64, 64, 1]), mk('image_b', u8, ['b', 64, 64, 3]),
       mk('prompt', i32, ['b'])],
      [mk('probabilities', f32, ['b', 64, 64, 1]), mk('mask', u8, ['b', 64, 64, 3])])
  model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', 17)])
  model.ir_version = 9
  onnx_export.set_metadata(model, 'prompt', ['roads'], 0.5)
  bundle_dir = tmp_path / 'bundle'
  bundle_dir.mkdir()
  onnx.save_model(model, str(bundle_dir / 'model.onnx'))
  err = _run_infer(capsys, '--backend', 'onnxruntime', '--onnx', str(bundle_dir / 'model.onnx'),
                   '--config', str(REPO / 'configs' / 'demo.py'), '--prompt', 'elsewhere',
                   '--a', rasters[0], '--b', rasters[1], '--out', str(tmp_path / 'o.tif'))
  _one_line_error(err, "--prompt 'elsewhere'", "['roads']", 'model_embeddings.onnx',
                  're-export with --prompts')
  assert sorted(os.listdir(tmp_path)) == ['a.tif', 'b.tif', 'bundle']


def test_report_refuses_runs_of_other_configs_or_data(tmp_path):
  from tests import test_report  # pylint: disable=g-import-not-at-top
  metrics = {'f1': 0.5, 'iou': 0.4, 'kappa': 0.3, 'precision': 0.5, 'recall': 0.5, 'oa': 0.9}
  a = test_report.make_run(tmp_path, 'a', 0, metrics)
  b = test_report.make_run(tmp_path, 'b', 1, metrics, overrides={'train.lr': 5e-4})
  c = test_report.make_run(tmp_path, 'c', 2, metrics, fingerprint='cd' * 32)
  out = tmp_path / 'rep'
  proc = _subprocess('segchange_jax.report', a, b, '--out', str(out))
  assert proc.returncode == 2, proc.stderr[-3000:]
  _one_line_error(proc.stderr, 'configs differ', 'train.lr', f'{a}: 0.0001', f'{b}: 0.0005')
  proc = _subprocess('segchange_jax.report', a, c, '--out', str(out))
  assert proc.returncode == 2, proc.stderr[-3000:]
  _one_line_error(proc.stderr, 'different data', f'{a}: abababababab', f'{c}: cdcdcdcdcdcd')
  assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'c']


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


def test_convert_on_leak_error_writes_nothing(tmp_path):
  import cv2  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pairs = {name: (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                  rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                  rng.integers(0, 2, (32, 32), dtype=np.uint8) * 255) for name in ('a', 'b')}
  for split, names in (('train', 'ab'), ('test', 'a')):  # test/a.png is train/a.png
    for name in names:
      for sub, img in zip(('A', 'B', 'label'), pairs[name]):
        (tmp_path / 'raw' / split / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / 'raw' / split / sub / f'{name}.png'), img)
  out = tmp_path / 'shards'
  args = ['--layout', 'segchange-default', '--root', str(tmp_path / 'raw'), '--out', str(out),
          '--splits', 'train,test', '--workers', '1']
  proc = _subprocess('data_prep.convert', *args, '--on_leak', 'error')
  assert proc.returncode == 2, proc.stderr[-3000:]
  _one_line_error(proc.stderr, 'split leaks', '1 pair(s)', 'train/a.png = test/a.png',
                  '--on_leak=warn')
  assert not out.exists()
  proc = _subprocess('data_prep.convert', *args, '--on_leak', 'nope')
  assert proc.returncode == 2
  _one_line_error(proc.stderr, '--on_leak', 'drop_from_train')
  assert not out.exists()


def test_tta_errors(capsys, rasters, tmp_path):
  # Test-time augmentation runs inside the JAX model: refused for the ONNX backend up front.
  err = _run_infer(capsys, '--a', rasters[0], '--b', rasters[1], '--out',
                   str(tmp_path / 'o.tif'), '--tta', 'd4', '--backend', 'onnxruntime',
                   '--onnx', str(tmp_path / 'model.onnx'))
  _one_line_error(err, '--tta d4', '--backend jax')
  proc = _subprocess('segchange_jax.infer', '--checkpoint', 'x', '--a', rasters[0], '--b',
                     rasters[1], '--out', str(tmp_path / 'o.tif'), '--tta', 'spin')
  assert proc.returncode == 2
  _one_line_error(proc.stderr, '--tta=spin', '<none|flips|d4>')
  # evaluate --tta d4 on records that a rotation would not keep square (64 x 96).
  test_evaluate_tta.make_wide_checkpoint(tmp_path)
  out = tmp_path / 'ev'
  proc = _subprocess('segchange_jax.evaluate', '--checkpoint', str(tmp_path / 'ckpt'), '--out',
                     str(out), '--tta', 'd4')
  assert proc.returncode == 2, proc.stderr[-3000:]
  _one_line_error(proc.stderr, '--tta d4', "square 'test' records", '64x96', '--tile')
  assert not out.exists()
  assert not (tmp_path / 'o.tif').exists()


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
