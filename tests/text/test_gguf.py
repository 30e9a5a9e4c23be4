"""Our Llama on the real SmolLM2-135M Q4_1 GGUF vs transformers' LlamaModel loaded from it."""

import time

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('gguf')
pytest.importorskip('accelerate')

from segchange_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from segchange_jax.text import gguf_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from segchange_jax.text import llama  # pylint: disable=g-import-not-at-top,wrong-import-position
from segchange_jax.text import loading  # pylint: disable=g-import-not-at-top,wrong-import-position

PROMPTS = ['Buildings with changes, Mound changes.', '', 'a road']


@pytest.fixture(scope='module')
def torch_llama(smollm_gguf):
  t0 = time.time()
  kw = dict(gguf_file=smollm_gguf.name)
  tok = transformers.AutoTokenizer.from_pretrained(str(smollm_gguf.parent), **kw)
  model = transformers.LlamaModel.from_pretrained(str(smollm_gguf.parent), dtype=torch.float32,
                                                  **kw).eval()
  print(f'transformers GGUF load {time.time() - t0:.1f}s')
  return tok, model


@pytest.fixture(scope='module')
def enc(smollm_gguf):
  return encoder_lib.TextEncoder.from_pretrained(str(smollm_gguf), max_tokens=8)


@pytest.mark.slow
def test_smollm_gguf_encode_matches_transformers(enc, torch_llama):
  tok, model = torch_llama
  tok.pad_token = tok.eos_token  # upstream: pad = eos
  live = [p for p in PROMPTS if p]
  ids = tok(live, padding=True, return_tensors='pt')['input_ids']
  with torch.no_grad():
    ref = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()
                ).last_hidden_state.numpy()
  ours = enc.encode(PROMPTS)
  assert ours.shape == (3, 8, 576) and enc.dim == 576 and enc.identity.startswith('llama-')
  assert not ours[1].any()
  k = min(8, ref.shape[1])
  want = np.stack([ref[0, :k], ref[1, :k]])
  err = np.abs(ours[[0, 2], :k] - want).max()
  scale = np.abs(want).max()
  print(f'SmolLM2 GGUF encode vs transformers LlamaModel: max abs err {err:.2e} '
        f'(max |ref| {scale:.1f}, rel {err / scale:.1e})')
  # 30 layers with hidden values up to ~1e2: float32 summation order matters at ~1e-5 relative.
  assert err <= 1e-4 * scale, err
  assert not ours[0, k:].any()


def test_smollm_gguf_two_layers_vs_transformers_processing(smollm_gguf):
  """Fast check on real weights: the first 2 blocks, dequantised by gguf, with Q/K rows restored
  by transformers' own LlamaTensorProcessor (torch side) vs by our gguf_io (JAX side)."""
  import gguf  # pylint: disable=g-import-not-at-top
  from gguf import quants  # pylint: disable=g-import-not-at-top
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # pylint: disable=g-import-not-at-top
  cfg, tensors = gguf_io.read(smollm_gguf, num_layers=2)
  ours_sd = dict(tensors)
  arch = loading.ARCHITECTURES['llama']
  module = llama.LlamaModel(llama.LlamaConfig.from_hf(cfg))
  import jax  # pylint: disable=g-import-not-at-top
  ids = np.array([[28120, 905, 18588, 616, 351, 2, 2]], np.int32)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids > 0))
  params = loading._place(ours_sd.items(), arch, abstract, np.float32, None, 'test')  # pylint: disable=protected-access

  reader = gguf.GGUFReader(str(smollm_gguf))
  proc = LlamaTensorProcessor(config=cfg)
  hf = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != 'model_type'})
  ref_model = transformers.LlamaModel(hf).eval()
  names = {'token_embd': 'embed_tokens', 'output_norm': 'norm'}
  blk = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
         'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
         'attn_output': 'self_attn.o_proj', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
         'ffn_down': 'mlp.down_proj'}
  sd = {}
  for t in reader.tensors:
    p = t.name.split('.')
    if p[0] == 'blk' and int(p[1]) >= 2:
      continue
    w = proc.process(np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32),
                     t.name).weights
    hf_name = (f'layers.{p[1]}.{blk[p[2]]}.weight' if p[0] == 'blk' else f'{names[p[0]]}.weight')
    sd[hf_name] = torch.from_numpy(np.array(w))
  missing, unexpected = ref_model.load_state_dict(sd, strict=False)
  assert not unexpected and all('rotary' in m for m in missing), (missing, unexpected)
  mask = ids != 2
  with torch.no_grad():
    ref = ref_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  ours = np.asarray(module.apply(params, ids, mask))
  err = np.abs(ours - ref).max()
  print(f'SmolLM2 GGUF 2 layers vs transformers: max abs err {err:.2e} (max |ref| '
        f'{np.abs(ref).max():.1f})')
  assert err <= 1e-5 * max(1.0, np.abs(ref).max()), err
