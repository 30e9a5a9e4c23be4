"""bench/multihost.py: collectives counted from optimized HLO text (loops run trip-count times,
tuple instructions move each array), and a bad --layouts value is one argparse line."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO / 'bench'))
import multihost  # pylint: disable=g-import-not-at-top,wrong-import-position

_OP = 'metadata={op_name="jit(train_step)/transpose(jvp(SegChangeModel))/%s"}'
# XLA's optimized HLO text, cut down to what the counter reads.
_HLO = '\n'.join([
    'HloModule jit_train_step',
    '',
    '%add (x: f32[], y: f32[]) -> f32[] {',
    '  ROOT %r = f32[] add(f32[] %x, f32[] %y)',
    '}',
    '',
    '%body (p: (s32[], f32[7,7,32])) -> (s32[], f32[7,7,32]) {',
    '  %all-reduce.1 = (f32[32]{0}, f32[32]{0}, f32[32]{0}) all-reduce(%a, %b, %c), '
    'channel_id=1, to_apply=%add, ' + _OP % 'fpn/ega/gaussian/while/body/closed_call/reduce_sum',
    '}',
    '',
    '%cond (p: (s32[], f32[7,7,32])) -> pred[] {',
    '  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT',
    '}',
    '',
    'ENTRY %main (param.1: f32[32]) -> f32[32] {',
    '  %while.1 = (s32[], f32[7,7,32]{2,1,0}) while(%tuple.1), condition=%cond, body=%body, '
    'backend_config={"known_trip_count":{"n":"16"}}',
    '  %collective-permute = f32[2,32,32,32]{3,2,1,0} collective-permute(%x), channel_id=2, '
    'source_target_pairs={{0,1}}, ' + _OP % 'slice',
    '  %all-reduce.2 = f32[32]{0} all-reduce(%y), channel_id=3, to_apply=%add, '
    + _OP % 'fpn/ega/gaussian_bn/reduce_sum',
    '  ROOT %all-reduce.3 = (' + ', '.join(['f32[32]{0}'] * 20) + ') all-reduce(%g), '
    'channel_id=4, to_apply=%add, ' + _OP % 'backbone/layers_0/attn/reduce_sum',
    '}',
])


def test_collective_counts_multiply_loops_and_count_tuple_arrays():
  counts = multihost.collective_counts(_HLO)
  assert counts['static'] == {'all-reduce': 3, 'collective-permute': 1}
  assert counts['per_step'] == {'all-reduce': 16 + 2, 'collective-permute': 1}
  assert counts['arrays'] == {'all-reduce': 3 * 16 + 1 + 20, 'collective-permute': 1}
  origins = counts['origins']
  assert origins['all-reduce <- loop in a written-out VJP: fpn/ega/gaussian (bwd)'] == 48
  assert origins['all-reduce <- parameter gradients (20 arrays in one combined instruction)'] == 20
  assert origins['all-reduce <- normalisation statistics: fpn/ega/gaussian_bn (bwd)'] == 1
  assert list(origins)[0].startswith('all-reduce <- loop')   # largest first


def test_bad_layout_is_one_argparse_line():
  proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'multihost.py'), '--layouts',
                         '2by4'], capture_output=True, text=True, cwd=REPO, timeout=60)
  assert proc.returncode == 2
  assert "'2by4' is not PROCESSESxDEVICES (e.g. 2x4)" in proc.stderr, proc.stderr
  proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'multihost.py'), '--layouts',
                         '3x1'], capture_output=True, text=True, cwd=REPO, timeout=60)
  assert proc.returncode == 2
  assert '--batch 8 must be a multiple of the 3 devices of layout 3x1' in proc.stderr, proc.stderr
