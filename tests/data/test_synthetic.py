"""data_prep.synthetic: determinism, layout and label properties."""

import hashlib
import os

import cv2
import numpy as np

from segchange_jax.data import synthetic


def _digest(root):
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(dirpath, f), 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_same_seed_same_bytes_and_layout(tmp_path):
  counts = synthetic.generate(str(tmp_path / 'a'), n=10, size=64, seed=3)
  synthetic.generate(str(tmp_path / 'b'), n=10, size=64, seed=3)
  synthetic.generate(str(tmp_path / 'c'), n=10, size=64, seed=4)
  assert counts == {'train': 6, 'val': 2, 'test': 2}
  assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')
  assert _digest(tmp_path / 'a') != _digest(tmp_path / 'c')
  for split, n in counts.items():
    for sub in ('A', 'B', 'label'):
      assert len(os.listdir(tmp_path / 'a' / split / sub)) == n
    lines = (tmp_path / 'a' / split / 'prompts.txt').read_text().splitlines()
    assert len(lines) == n and all('  ' in line for line in lines)


def test_label_marks_object_changes_not_photometric_ones():
  fractions = []
  for i in range(12):
    a, b, label, prompt = synthetic.make_scene(0, i, 96)
    assert a.shape == b.shape == (96, 96, 3) and label.shape == (96, 96)
    assert set(np.unique(label)) <= {0, 255}
    fractions.append((label > 0).mean())
    # Prompt names a change exactly when the label has one.
    assert (prompt == 'No changes.') == (not label.any())
    # Unchanged pixels still differ (radiometry/haze/noise/shift), so the label is not |A-B|.
    diff = np.abs(a.astype(int) - b.astype(int)).mean(-1)
    if (label == 0).any():
      assert diff[label == 0].mean() > 3.0
    if label.any() and (label == 0).any():
      # After removing the global colour transform (least squares B ~ A M + o fitted on
      # unchanged pixels), changed pixels stand out: the change is a learnable signal.
      x = np.c_[a.reshape(-1, 3), np.ones(a.shape[0] * a.shape[1])].astype(float)
      y = b.reshape(-1, 3).astype(float)
      keep = label.reshape(-1) == 0
      coef, *_ = np.linalg.lstsq(x[keep], y[keep], rcond=None)
      residual = np.abs(x @ coef - y).mean(-1)
      assert np.median(residual[~keep]) > 2 * np.median(residual[keep])
  mean = float(np.mean(fractions))
  assert 0.005 < mean < 0.5, mean


def test_scene_independent_of_generation_order():
  a1 = synthetic.make_scene(7, 5, 64)
  synthetic.make_scene(7, 4, 64)
  a2 = synthetic.make_scene(7, 5, 64)
  for x, y in zip(a1[:3], a2[:3]):
    np.testing.assert_array_equal(x, y)


def test_cli_writes_png_files(tmp_path, repo_root):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path / 's'
  subprocess.run([sys.executable, '-m', 'data_prep.synthetic', '--out', str(out), '--n', '4',
                  '--size', '48'], cwd=repo_root, check=True,
                 env={**os.environ, 'PYTHONPATH': str(repo_root)})
  img = cv2.imread(str(out / 'train' / 'A' / 'train_00000.png'))
  assert img.shape == (48, 48, 3)
