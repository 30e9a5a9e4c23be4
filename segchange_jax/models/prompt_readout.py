"""Per-prompt dynamic readout (`config.model.prompt_conditioning='dynamic_head'`).

With 'film_head' the prompt acts before the mask head's 3x3 output conv, so that conv and the
1x1 before it run at full resolution once per prompt: four prompts cost 1.36x the FLOPs of one
for Swin-B at 512 px, and 2.07x the time on CPU (bench/README.md, "Several prompts in one pass").
'dynamic_head' runs the head's output convs once per pair without the prompt and reads their
maps with a small network per prompt: two 1x1 convs whose weights are generated from the prompt
and its attended image vector (the head's text query pooled over the pixels), as CondInst
(Tian et al. 2020) generates a small mask head per instance. The per-prompt work is a
[D x hidden] and a [hidden x K] product per pixel (D: the head's C/2 + C/4 channels), a few per
cent of one forward pass. A FiLM of the last map alone (a per-channel scale and shift of its C/4
channels) was tried first and did not select (macro F1 0.27 vs 0.57 for 'film_head' on the demo).

The generated network adds to the head's own last 1x1 conv (upstream's output): its output
layer starts at zero, so at the start every prompt gets that prompt-independent map.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segchange_jax.models import layers


class PromptReadout(nn.Module):
  """(maps [B, H, W, D], text [B, P, T, L], attended query [B, P, C]) -> logits [B, H, W, P, K].

  Generated per prompt: W1 [D, hidden] (scaled by D^-1/2), b1, W2 [hidden, K], b2; per pixel
  relu(x W1 + b1) W2 + b2. W2 and b2 come from zero-started layers.
  """
  hidden: int = 16
  num_classes: int = 1
  generator: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: jax.Array, text: jax.Array, query: jax.Array) -> jax.Array:
    d, k, dt = maps.shape[-1], self.num_classes, self.dtype
    pooled = jnp.mean(text.astype(jnp.float32), axis=-2).astype(dt)
    g = layers.dense(self.generator, dt, 'fc1')(pooled)
    g = nn.relu(g + layers.dense(self.generator, dt, 'fc_query', use_bias=False)(query.astype(dt)))
    b, p = g.shape[:2]
    w1 = layers.dense(d * self.hidden, dt, 'w1')(g).reshape(b, p, d, self.hidden) * d ** -0.5
    b1 = layers.dense(self.hidden, dt, 'b1')(g)
    zero = lambda name, n: nn.Dense(n, dtype=dt, param_dtype=jnp.float32,
                                    kernel_init=nn.initializers.zeros, name=name)(g)
    w2 = zero('w2', self.hidden * k).reshape(b, p, self.hidden, k)
    b2 = zero('b2', k)
    z = nn.relu(jnp.einsum('bhwd,bpde->bhwpe', maps.astype(dt), w1) + b1[:, None, None])
    y = jnp.einsum('bhwpe,bpek->bhwpk', z, w2) + b2[:, None, None]
    return y.astype(jnp.float32)
