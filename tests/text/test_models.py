"""Parity of our BERT / Phi / Llama with transformers' PyTorch models (small random configs)."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from segchange_jax.text import loading  # pylint: disable=g-import-not-at-top,wrong-import-position

IDS = np.array([[5, 9, 17, 3, 44, 2, 7, 1, 8], [6, 11, 4, 2, 0, 0, 0, 0, 0]], np.int64)


def _small(kind):
  if kind == 'bert':
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, layer_norm_eps=1e-12)
    return transformers.BertModel(cfg, add_pooling_layer=True), 0
  if kind == 'phi':
    cfg = transformers.PhiConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=48,
                                 max_position_embeddings=32, partial_rotary_factor=0.5)
    return transformers.PhiModel(cfg), 2
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=2,
                                 intermediate_size=40, max_position_embeddings=32,
                                 rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
  return transformers.LlamaModel(cfg), 2


def _randomise(model):
  # Random init leaves LayerNorm at 1/0 and biases at 0: perturb everything so each is tested.
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize('kind', ['bert', 'phi', 'llama'])
def test_parity_fp32(kind, tmp_path):
  torch.manual_seed(0)
  model, pad = _small(kind)
  _randomise(model)
  model.eval()
  model.save_pretrained(tmp_path)
  ids = np.where(IDS == 0, pad, IDS)
  ids[1, 4:] = pad
  mask = ids != pad
  mask[0] = True  # first row has no padding (id `pad` may appear in its text)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long()
                ).last_hidden_state.numpy()
  lm = loading.load(tmp_path)
  assert lm.model_type == kind
  ours = np.asarray(lm.module.apply(lm.params, ids.astype(np.int32), mask))
  # Compare every position: padded positions are part of upstream's [T, L] embedding.
  err = np.abs(ours - ref).max()
  print(f'{kind} fp32 max abs err {err:.2e} (max |ref| {np.abs(ref).max():.2f})')
  assert err <= 1e-5, err


def test_unknown_model_type_and_missing_weights(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "gpt_neox"}')
  with pytest.raises(ValueError, match=r"gpt_neox.*supported: \['bert', 'llama', 'phi'\]"):
    loading.load(tmp_path)
  (tmp_path / 'config.json').write_text('{"model_type": "bert"}')
  with pytest.raises(FileNotFoundError, match='no model.safetensors'):
    loading.load(tmp_path)
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(ValueError, match='safetensors only'):
    loading.load(tmp_path)


def test_sharded_load_places_big_params_over_fsdp(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  model, _ = _small('llama')
  model.save_pretrained(tmp_path)
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  lm = loading.load(tmp_path, mesh=mesh, axis='fsdp', min_size=1024)
  emb = lm.params['params']['embed_tokens']['embedding']  # [64, 48] = 3072 elements
  norm = lm.params['params']['norm']['weight']
  assert emb.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  assert norm.sharding.spec == jax.sharding.PartitionSpec(None)
  ids = np.array([[3, 4, 5, 6]], np.int32)
  ref = loading.load(tmp_path)
  np.testing.assert_allclose(np.asarray(lm.module.apply(lm.params, ids, ids > 0)),
                             np.asarray(ref.module.apply(ref.params, ids, ids > 0)), atol=1e-5)
