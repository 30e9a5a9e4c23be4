"""config.model.prompt_conditioning ('film_head', 'film_neck'): starts exactly as upstream's model,
lets the prompt act after GroupNorms (where upstream's per-channel prompt gain is erased), keeps
the several-prompts-in-one-pass contract, and loads upstream checkpoints."""

import jax
import numpy as np
import pytest

from segchange_jax import config_lib
from segchange_jax.models import diff
from segchange_jax.models import prompt_film
from segchange_jax.models import segchange
from tests.eval import tiny

SIZE = 64
FILM = ('film_head', 'film_neck')


def _config(conditioning, **overrides):
  config = tiny.tiny_config()
  config.model.prompt_conditioning = conditioning
  for key, value in overrides.items():
    setattr(config.model, key, value)
  return config


def _inputs(prompts=2, seed=0):
  rs = np.random.RandomState(seed)
  a, b = (rs.randn(2, SIZE, SIZE, 3).astype(np.float32) for _ in range(2))
  return a, b, rs.randn(2, prompts, 8, tiny.TEXT_DIM).astype(np.float32)


def _film_blocks(params):
  """The FiLM modules' parameter dicts in a params tree."""
  found = [params['params']['mask_head']['prompt_film']]
  if 'prompt_film_neck' in params['params']:
    found.append(params['params']['prompt_film_neck'])
  return found


def _moved(params, seed=1):
  """`params` with every FiLM output layer drawn at random (it starts at zero)."""
  rs = np.random.RandomState(seed)
  params = jax.tree.map(np.array, params)
  for block in _film_blocks(params):
    for name in ('kernel', 'bias'):
      block['fc2'][name] = (rs.randn(*block['fc2'][name].shape) / 10).astype(np.float32)
  return params


# film_head is tested as configs/demo_prompts.py uses it, with the signed difference.
_WITH = {'film_head': {'signed_difference': 'scales'}, 'film_neck': {}}


def _upstream_plus_start(conditioning):
  """(upstream-shaped random variables, the same converted into a FiLM model: upstream's
  state_dict loaded, the FiLM blocks (and signed difference maps) at their start), and the FiLM
  model."""
  plain = tiny.random_variables(_config('none'))
  film = _config(conditioning, **_WITH[conditioning])
  sd = segchange.export_torch_state_dict(_config('none'), plain)
  return plain, segchange.build_model(film), segchange.load_torch_state_dict(film, sd,
                                                                             image_size=SIZE)


@pytest.mark.parametrize('conditioning', FILM)
def test_film_starts_as_upstream_and_then_follows_the_prompt(conditioning):
  a, b, text = _inputs()
  plain, model, params = _upstream_plus_start(conditioning)
  # (float32 sums in another order: the neck runs on repeated rows, the head on a plain map)
  out_plain = np.asarray(jax.jit(segchange.build_model(_config('none')).apply)(plain, a, b, text))
  fwd = jax.jit(model.apply)
  np.testing.assert_allclose(np.asarray(fwd(params, a, b, text)), out_plain, atol=5e-5, rtol=0)
  moved = _moved(params)
  multi = np.asarray(fwd(moved, a, b, text))
  assert np.abs(multi - out_plain).max() > 1e-2
  if conditioning == 'film_head':   # its several-prompt path is the head's (test_multi_prompt)
    return
  # 'film_neck' runs neck and head on B * P rows: several prompts in one call are the
  # single-prompt calls, prompt by prompt.
  for p in range(text.shape[1]):
    single = np.asarray(fwd(moved, a, b, text[:, p]))
    np.testing.assert_allclose(multi[..., p], single[..., 0], atol=1e-4, rtol=0, err_msg=str(p))


@pytest.mark.slow
def test_film_neck_classes_and_train_mode():
  config = _config('film_neck', num_classes=3, dropout=0.0)
  model = segchange.build_model(config)
  params = _moved(tiny.random_variables(config))
  a, b, text = _inputs(prompts=2)
  fwd = jax.jit(lambda v, a, b, t: model.apply(v, a, b, t, train=True, mutable=['batch_stats'],
                                               rngs={'dropout': jax.random.PRNGKey(0)})[0])
  multi = np.asarray(fwd(params, a, b, text))
  assert multi.shape == (2, SIZE, SIZE, 2, 3)
  assert np.isfinite(multi).all()


def test_film_can_switch_a_prompt_off():
  # Upstream's head renormalises every map, so no prompt can make a whole map negative; FiLM acts
  # after the normalisation, so a prompt's shift can (a large negative shift on every channel
  # after the last GroupNorm zeroes the ReLU and leaves only the final bias).
  a, b, text = _inputs(prompts=1)
  config = _config('film_head')
  model = segchange.build_model(config)
  params = jax.tree.map(np.array, tiny.random_variables(config))
  head = params['params']['mask_head']
  film = head['prompt_film']
  c4 = head['out_conv2']['kernel'].shape[0]
  film['fc2']['kernel'] = np.zeros_like(film['fc2']['kernel'])
  bias = np.zeros_like(film['fc2']['bias'])
  bias[-c4:] = -100.0            # shift of the second conditional norm
  film['fc2']['bias'] = bias
  head['out_conv2']['bias'] = np.full_like(head['out_conv2']['bias'], -3.0)
  out = np.asarray(jax.jit(model.apply)(params, a, b, text))
  np.testing.assert_allclose(out, -3.0, atol=1e-5)


@pytest.mark.parametrize('conditioning', FILM)
def test_converted_upstream_checkpoint_starts_film_at_identity(conditioning):
  # (that the converted model gives upstream's logits: test_film_starts_as_upstream_...)
  _, _, converted = _upstream_plus_start(conditioning)
  blocks = _film_blocks(converted)
  assert len(blocks) == (2 if conditioning == 'film_neck' else 1)
  for block in blocks:
    assert not np.any(block['fc2']['kernel']) and not np.any(block['fc2']['bias'])
    assert np.any(block['fc1']['kernel'])
  signed = converted['params'].get('signed_difference', {})
  assert len(signed) == (4 if _WITH[conditioning] else 0)
  assert not any(np.any(p['kernel']) for p in signed.values())
  with pytest.raises(ValueError, match=f"prompt_conditioning='{conditioning}' has no upstream"):
    segchange.export_torch_state_dict(_config(conditioning), converted)
  with pytest.raises(ValueError, match="signed_difference='scales' has no upstream"):
    segchange.export_torch_state_dict(_config('none', signed_difference='scales'), converted)


def test_config_choice_is_checked():
  with pytest.raises(config_lib.ConfigError, match='prompt_conditioning'):
    config_lib.validate_config(_config('film'))
  assert config_lib.PROMPT_CONDITIONINGS == prompt_film.CONDITIONINGS
  with pytest.raises(config_lib.ConfigError, match='signed_difference'):
    config_lib.validate_config(_config('none', signed_difference='both'))
  assert config_lib.SIGNED_DIFFERENCES == diff.SIGNED_DIFFERENCES
  # A saved config the validation never saw (e.g. an older run's config.json) fails in the model.
  with pytest.raises(ValueError, match=r"signed_difference=True is not one of \['none'"):
    diff.signed_difference_of({'signed_difference': True})
  assert diff.signed_difference_of({}) == 'none'


def test_film_cost():
  # XLA FLOPs with 4 prompts: 'film_head' adds two small matmuls per prompt; 'film_neck' runs the
  # neck once per prompt but the backbone, BEV and difference still once per pair.
  def flops(conditioning, prompts=4):
    config = _config(conditioning)
    model = segchange.build_model(config)
    shapes = segchange.variable_shapes(model, SIZE)
    a, b, text = _inputs(prompts=prompts)
    cost = jax.jit(lambda v, a, b, t: model.apply(v, a, b, t)).lower(
        shapes, a, b, text).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  plain, head, neck = flops('none'), flops('film_head'), flops('film_neck')
  print(f'HLO flops, 4 prompts: none {plain:.4g}, film_head {head:.4g}, film_neck {neck:.4g}')
  assert plain < head < 1.02 * plain, (plain, head)
  assert head < neck < 4 * flops('film_neck', prompts=1), (head, neck)



@pytest.mark.slow   # 'scales' at its start: test_film_starts_as_upstream_...[film_head]
@pytest.mark.parametrize('where', ['map', 'scales'])
def test_signed_difference_starts_as_upstream_and_then_adds_the_signed_map(where):
  # config.model.signed_difference: a converted upstream checkpoint starts with the map's
  # weights at zero (upstream's logits), once moved they change the logits (so they get a
  # gradient); an upstream state_dict cannot hold them.
  a, b, text = _inputs()
  plain = tiny.random_variables(_config('none'))
  sd = segchange.export_torch_state_dict(_config('none'), plain)
  config = _config('film_head', signed_difference=where)
  params = segchange.load_torch_state_dict(config, sd, image_size=SIZE)
  kernel = params['params']['signed_difference']['proj_0']['kernel']
  width = config.model.fpn_dim if where == 'map' else config.model.out_dims[0]
  assert kernel.shape == (config.model.out_dims[0], width) and not np.any(kernel)
  out_plain = np.asarray(jax.jit(segchange.build_model(_config('none')).apply)(plain, a, b, text))
  fwd = jax.jit(segchange.build_model(config).apply)
  np.testing.assert_allclose(np.asarray(fwd(params, a, b, text)), out_plain, atol=5e-5, rtol=0)
  moved = _with_signed(params, np.random.RandomState(2).randn(*kernel.shape) / 3)
  assert np.abs(np.asarray(fwd(moved, a, b, text)) - out_plain).max() > 1e-2
  with pytest.raises(ValueError, match=f"signed_difference='{where}' has no upstream counterpart"):
    segchange.export_torch_state_dict(_config('none', signed_difference=where), plain)


def _with_signed(params, kernel):
  """`params` with the signed difference's weights replaced."""
  params = dict(params, params=dict(params['params']))
  params['params']['signed_difference'] = dict(params['params']['signed_difference'])
  params['params']['signed_difference']['proj_0'] = {'kernel': jax.numpy.asarray(
      kernel, jax.numpy.float32)}
  return params
