"""bench/prompt_selectivity.py and bench/feature_probe.py: the figures' definitions on hand-made
masks (F1, off-target share, negative / positive area, paraphrase mapping, probe targets)."""

import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))
import feature_probe  # pylint: disable=g-import-not-at-top,wrong-import-position
import prompt_selectivity as ps  # pylint: disable=g-import-not-at-top,wrong-import-position

KINDS = ['new buildings', 'new roads']


def _mask(*cells):
  m = np.zeros((4, 4), bool)
  for r, c in cells:
    m[r, c] = True
  return m


def test_scores_on_hand_made_masks():
  build, road = _mask((0, 0), (0, 1)), _mask((3, 3))
  pairs = [dict(targets={'new buildings': build, 'new roads': road, 'any change': build | road}),
           dict(targets={'any change': _mask()})]          # nothing changed in pair 2
  masks = [
      # 'new buildings' marks its two pixels and the road pixel: 1 of 3 off target.
      {'new buildings': build | road, 'new roads': road, 'any change': build | road,
       'newly constructed houses': build},
      # pair 2: both kind prompts are negatives; 'new roads' marks 2 pixels of 16.
      {'new buildings': _mask(), 'new roads': _mask((1, 1), (2, 2)), 'any change': _mask(),
       'newly constructed houses': _mask()}]
  s = ps.score(masks, pairs, KINDS, 'any change')
  assert s['off_target'] == {'new buildings': 1 / 3, 'new roads': 0.0}
  assert s['off_target_all'] == 1 / 6   # of 3 + 1 + 2 marked pixels
  assert np.isclose(s['f1']['new buildings'], 2 * 2 / (2 * 2 + 1))
  assert np.isclose(s['f1']['new roads'], 2 * 1 / (2 * 1 + 2))   # 2 false positives in pair 2
  assert s['f1']['any change'] == 1.0
  # The paraphrase is scored against the target of the prompt it stands for.
  assert s['f1']['newly constructed houses'] == 1.0
  assert s['counts'] == {'positive': 2, 'negative': 2}
  assert np.isclose(s['positive_area'], (3 / 16 + 1 / 16) / 2)
  assert np.isclose(s['negative_area'], (0 + 2 / 16) / 2)
  assert np.isclose(s['negative_over_positive'], (1 / 16) / (2 / 16))
  # One negative marks pixels, both in no change (pair 2 has no change to mark).
  assert s['negatives_marking'] == 1 and s['negative_pixels_on_change'] == 0.0
  # Where each kind prompt marks: 'new buildings' 2 of 3 on its target, 1 on the road's, none
  # in no change; 'new roads' 1 of 3 on its own and 2 (pair 2) in no change.
  np.testing.assert_allclose(s['where']['new buildings'], [2 / 3, 1 / 3, 0])
  np.testing.assert_allclose(s['where']['new roads'], [0, 1 / 3, 2 / 3])
  # Only a road changed; 'new buildings' (a negative) marks it and one unchanged pixel.
  road_only = [dict(targets={'new roads': road, 'any change': road})]
  s = ps.score([{'new buildings': road | _mask((1, 1)), 'new roads': road, 'any change': road}],
               road_only, KINDS, 'any change')
  assert s['negatives_marking'] == 1 and s['negative_pixels_on_change'] == 0.5


def test_probe_targets_at_a_coarser_map():
  targets = np.arange(2 * 8 * 8).reshape(2, 8, 8)
  coarse = feature_probe.at_resolution(targets, 2)   # stride 4: the cells' centres (2, 2) ...
  assert coarse.shape == (2, 2, 2) and coarse[1, 1, 0] == targets[1, 6, 2]


def test_probe_targets_and_balanced_accuracy():
  build, road = _mask((0, 0), (0, 1)), _mask((0, 1), (3, 3))
  pairs = [dict(targets={'new buildings': build, 'new roads': road, 'any change': build | road})]
  y = feature_probe.pixel_targets(pairs, KINDS)[0]
  assert y[0, 0] == 1 and y[3, 3] == 2 and y[0, 1] == -1 and y[2, 2] == 0
  truth, pred = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
  assert feature_probe.balanced_accuracy(truth, pred) == 0.5   # the majority class scores chance
  x = np.array([[0.0], [0.1], [1.0], [1.1]], np.float32)
  predict = feature_probe.fit_softmax(x, np.array([0, 0, 1, 1]), 2, steps=200)
  assert list(predict(x)) == [0, 0, 1, 1]


def test_spread_over_runs():
  runs = [{'f1': {'any change': a}, 'macro_f1_kinds': m, 'off_target_all': o,
           'negative_over_positive': n}
          for a, m, o, n in ((0.8, 0.6, 0.2, 0.1), (0.7, 0.4, 0.5, 0.7))]
  s = ps.spread(runs, 'any change')
  assert s['macro_f1_kinds'] == {'mean': 0.5, 'min': 0.4, 'max': 0.6, 'runs': 2}
  assert np.isclose(s['f1_any_change']['mean'], 0.75)
  assert s['negative_over_positive']['max'] == 0.7 and s['off_target_all']['min'] == 0.2


def test_nearest_trained_prompt_of_a_paraphrase():
  # 'piles of earth that appeared' stands for 'new mounds' but points nearer 'removed mounds'.
  vectors = {'new mounds': np.array([[1.0, 0.0], [1.0, 0.0]]),
             'removed mounds': np.array([[0.0, 2.0], [0.0, 2.0]]),
             'piles of earth that appeared': np.array([[1.0, 3.0], [1.0, 1.0]])}   # mean (1, 2)
  out = ps.nearest(vectors, ['new mounds', 'removed mounds'])
  near, cos, own = out['piles of earth that appeared']
  assert list(out) == ['piles of earth that appeared'] and near == 'removed mounds'
  assert np.isclose(cos, 2 / np.sqrt(5)) and np.isclose(own, 1 / np.sqrt(5))
