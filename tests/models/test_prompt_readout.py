"""config.model.prompt_conditioning='dynamic_head' (models/prompt_readout.py): the head's convs run
once per pair, a per-prompt network with generated weights reads them; the
several-prompts-in-one-pass contract, what runs per prompt, conversion from and refusal of
export to upstream state_dicts."""

import jax
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.models import segchange
from tests.eval import tiny
from tests.models import test_prompt_conditioning as film_tests

SIZE = film_tests.SIZE

# The output layers that start at zero, per added module of the mask head.
ZERO_STARTED = {'prompt_film': ('fc2',), 'prompt_readout': ('w2', 'b2')}


def _config(conditioning='dynamic_head', **overrides):
  return film_tests._config(conditioning, **overrides)


def _acting(params, seed=1):
  """`params` with the head's zero-started output layers (FiLM, readout) drawn at random."""
  rs = np.random.RandomState(seed)
  params = jax.tree.map(np.array, params)
  head = params['params']['mask_head']
  for module, layers in ZERO_STARTED.items():
    for layer in layers if module in head else ():
      block = head[module][layer]
      for name in ('kernel', 'bias'):
        block[name] = (rs.randn(*block[name].shape) / 3).astype(np.float32)
  return params


def test_several_prompts_are_the_single_prompt_calls():
  config = _config(signed_difference='scales')
  model = segchange.build_model(config)
  params = _acting(tiny.random_variables(config))
  a, b, text = film_tests._inputs(prompts=3)
  fwd = jax.jit(model.apply)
  multi = np.asarray(fwd(params, a, b, text))
  assert multi.shape == (2, SIZE, SIZE, 3)
  for p in range(3):
    single = np.asarray(fwd(params, a, b, text[:, p]))
    assert single.shape == (2, SIZE, SIZE, 1)
    np.testing.assert_allclose(multi[..., p], single[..., 0], atol=1e-4, rtol=0, err_msg=str(p))
  assert np.abs(multi[..., 0] - multi[..., 1]).max() > 1e-2   # the prompts differ


def test_dynamic_head_runs_the_output_convs_once_per_pair():
  # At the start (the readout's output layer zero) every prompt gets the same map: the head's
  # convs do not see the prompt. Once the readout acts the prompts differ. The FLOPs of 4
  # prompts stay close to 1.
  config = _config()
  model = segchange.build_model(config)
  params = jax.tree.map(np.array, tiny.random_variables(config))
  readout = params['params']['mask_head']['prompt_readout']
  for layer in ZERO_STARTED['prompt_readout']:   # as they start (init and upstream conversion)
    readout[layer] = jax.tree.map(np.zeros_like, readout[layer])
  a, b, text = film_tests._inputs(prompts=3)
  fwd = jax.jit(model.apply)
  start = np.asarray(fwd(params, a, b, text))
  np.testing.assert_allclose(start[..., 0], start[..., 2], atol=1e-5)
  acting = np.asarray(fwd(_acting(params), a, b, text))
  assert np.abs(acting[..., 0] - acting[..., 2]).max() > 1e-2

  def flops(prompts):
    t = film_tests._inputs(prompts=prompts)[2]
    shapes = segchange.variable_shapes(model, SIZE)
    lowered = jax.jit(lambda v, a, b, t: model.apply(v, a, b, t)).lower(shapes, a, b, t)
    cost = lowered.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  ratio = flops(4) / flops(1)
  print(f'HLO flops, 4 prompts over 1: dynamic_head {ratio:.3f}')
  # Tiny widths at 64 px, where the head is a large share: 1.13x here (the readout's first
  # layer reads the neck map's 32 channels besides the head's 24), film_head, whose output
  # convs run per prompt, 1.24x (test_film_cost compares it with 'none'); Swin-B at 512 px in
  # bench/README.md.
  assert ratio < 1.17, ratio


def test_conversion_starts_the_readout_and_export_refuses_it():
  plain = tiny.random_variables(film_tests._config('none'))
  sd = segchange.export_torch_state_dict(film_tests._config('none'), plain)
  config = _config()
  config_lib.validate_config(config)
  converted = segchange.load_torch_state_dict(config, sd, image_size=SIZE)
  head = converted['params']['mask_head']
  np.testing.assert_array_equal(head['out_conv0']['kernel'],
                                plain['params']['mask_head']['out_conv0']['kernel'])
  readout = head['prompt_readout']
  assert not np.any(readout['w2']['kernel']) and not np.any(readout['b2']['bias'])
  assert np.any(readout['fc_query']['kernel']) and np.any(readout['w1']['kernel'])
  shapes = jax.tree.map(lambda x: x.shape, segchange.variable_shapes(
      segchange.build_model(config), SIZE))
  assert jax.tree.map(np.shape, converted) == shapes
  # Upstream's out_conv2 map, the same for every prompt: the readout adds nothing yet.
  out = np.asarray(jax.jit(segchange.build_model(config).apply)(converted,
                                                                *film_tests._inputs(prompts=2)))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-5)
  with pytest.raises(ValueError, match="prompt_conditioning='dynamic_head' has no upstream"):
    segchange.export_torch_state_dict(config, converted)
