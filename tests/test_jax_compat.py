"""jax_compat.unroll_cpu_threefry: the same random bits as JAX's rolled CPU lowering, no loop."""

import os
import subprocess
import sys
import textwrap

# In a child process: the rolled lowering must be what JAX uses before the call, whatever
# other tests of this session already enabled.
_CHILD = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from segchange_jax import jax_compat
    key = jax.random.PRNGKey(7)
    draw = lambda k: (jax.random.bernoulli(k, 0.9, (3, 1000)),
                      jax.random.uniform(jax.random.fold_in(k, 1), (257,)),
                      jax.random.split(k, 4))
    rolled_hlo = jax.jit(draw).lower(key).as_text()
    rolled = jax.jit(draw)(key)
    assert jax_compat.unroll_cpu_threefry()
    unrolled_hlo = jax.jit(lambda k: draw(k)).lower(key).as_text()
    unrolled = jax.jit(lambda k: draw(k))(key)
    assert 'while' in rolled_hlo and 'while' not in unrolled_hlo
    for a, b in zip(rolled, unrolled):
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    print('ok')
''')


def test_unrolled_threefry_draws_the_same_bits_without_a_loop():
  out = subprocess.run([sys.executable, '-c', _CHILD], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]
