"""Per-prompt dynamic readout (`config.model.prompt_conditioning='dynamic_head'`).

With 'film_head' the prompt acts before the mask head's 3x3 output conv, so that conv and the
1x1 before it run at full resolution once per prompt: four prompts cost 1.36x the FLOPs of one
for Swin-B at 512 px, and 1.7-2.1x the time on CPU (bench/README.md, "Several prompts in one
pass"); 'dynamic_head' 1.04x the FLOPs and 1.07x the time.
'dynamic_head' runs the head's output convs once per pair without the prompt and reads their
maps with a small network per prompt: two 1x1 convs whose weights are generated from the prompt
and its attended image vector (the head's text query pooled over the pixels), as CondInst
(Tian et al. 2020) generates a small mask head per instance. The per-prompt work is a
[D x hidden] and a [hidden x K] product per pixel (D: the head's C/2 + C/4 channels and the Cx
of the map the head was given), a few per cent of one forward pass.

Why it also reads the neck's map: the head's two maps are trained first of all for the
prompt-independent map they feed, and read alone they mixed kinds of one direction (new mounds
marked as new buildings); the neck's map holds kind and direction (a linear probe reads the six
targets at 0.82, bench/feature_probe.py). On the demo's prompt scenes (bench/README.md, one run
each, 504 steps) adding it took macro F1 from 0.55 to 0.70 and the off-target share from 29 %
to 12 %. A FiLM of the last map alone (a per-channel scale and shift of its C/4 channels) was
tried first and did not select (macro F1 0.27).

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
  """(head maps [B, H, W, D0], neck map [B, H, W, Cx], text [B, P, T, L], attended query
  [B, P, C]) -> logits [B, H, W, P, K].

  The network reads x = concat[head maps, GroupNorm(neck map)] (D channels). Generated per
  prompt: W1 [D, hidden] (scaled by D^-1/2), b1, W2 [hidden, K], b2; per pixel
  relu(x W1 + b1) W2 + b2. W2 and b2 come from zero-started layers.
  """
  hidden: int = 16
  num_classes: int = 1
  generator: int = 128
  groups: int = 8   # of the neck map's GroupNorm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: jax.Array, neck: jax.Array, text: jax.Array,
               query: jax.Array) -> jax.Array:
    dt = self.dtype
    neck = layers.group_norm(self.groups, dt, 'neck_gn')(neck.astype(dt))
    maps = jnp.concatenate([maps.astype(dt), neck], -1)
    d, k = maps.shape[-1], self.num_classes
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
