"""Prompt conditioning (`config.model.prompt_conditioning`): FiLM after normalisation.

Why upstream's head cannot select (measured in bench/README.md, "Prompts that choose the
change"): its only per-pixel use of the prompt is a per-channel gain on the map before the head's
first output conv, and every map is then GroupNorm-ed on its own, which takes each group to zero
mean and unit variance over the pixels. Whatever overall gain or offset the prompt applied is
erased, so a prompt cannot switch its map off where its kind did not change, and the
prompt-agnostic features decide what lights up.

The options add a prompt-computed per-channel scale and shift AFTER GroupNorms (conditional
normalisation, FiLM: Perez et al. 2018), where normalisation no longer undoes it:
- 'none': upstream's model, exact upstream logits;
- 'film_head': after the mask head's two output GroupNorms (two small matmuls per prompt; the
  rest of the model runs once per pair);
- 'film_neck': also after the neck's per-scale GroupNorms, so the fused full-resolution map is
  computed per prompt (the neck and head run once per (pair, prompt); backbone, BEV and
  difference once per pair);
- 'dynamic_head': not a FiLM; the head's output convs run once per pair WITHOUT the prompt and
  a small per-prompt 1x1 conv network, its weights generated from the prompt, reads their maps
  and the neck's (models/prompt_readout.py), so several prompts cost little more than one.
Every FiLM projection starts at zero (scale 1, shift 0): an initialised model, or an upstream
checkpoint converted into one, gives exactly the 'none' logits until training moves it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.models import fields
from segchange_jax.models import layers

CONDITIONINGS = ('none', 'film_head', 'film_neck', 'dynamic_head')


def conditioning_of(model_cfg) -> str:
  """config.model.prompt_conditioning, 'none' for configs saved before the field existed."""
  return fields.model_field(model_cfg, 'prompt_conditioning', 'none', CONDITIONINGS)


def conditions_head(conditioning: str) -> bool:
  return conditioning in ('film_head', 'film_neck')


def conditions_neck(conditioning: str) -> bool:
  return conditioning == 'film_neck'


def reads_per_prompt(conditioning: str) -> bool:
  """The head's output convs run without the prompt; a per-prompt readout follows them."""
  return conditioning == 'dynamic_head'


class PromptFiLM(nn.Module):
  """Prompt embeddings [..., T, L] -> (scale, shift) [..., C] per entry of `widths`.

  The tokens are mean-pooled as the mask head pools its text query. The scale is 1 + a learned
  term and the shift a learned term, both exactly zero at initialisation.
  """
  widths: tuple[int, ...]
  hidden: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    pooled = jnp.mean(text.astype(jnp.float32), axis=-2)
    h = nn.relu(layers.dense(self.hidden, self.dtype, 'fc1')(pooled.astype(self.dtype)))
    out = nn.Dense(2 * sum(self.widths), dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=nn.initializers.zeros, name='fc2')(h)
    pairs, start = [], 0
    for w in self.widths:
      pairs.append((1 + out[..., start:start + w], out[..., start + w:start + 2 * w]))
      start += 2 * w
    return pairs


def modulate(y: jax.Array, film: tuple[jax.Array, jax.Array] | None) -> jax.Array:
  """y [N, H, W, C] * scale + shift, each [N, C] (one row per map); identity for None."""
  if film is None:
    return y
  scale, shift = (f.reshape(y.shape[0], 1, 1, -1).astype(y.dtype) for f in film)
  return y * scale + shift
