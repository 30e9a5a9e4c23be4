"""The start-of-training line: parameter count and FLOPs per example from the compiled step."""

import logging

import jax
import jax.numpy as jnp

from segchange_jax.train import loop


def test_log_model_cost_reports_params_and_flops_per_example(caplog):
  compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((8, 8))).compile()
  with caplog.at_level(logging.INFO):
    flops = loop.log_model_cost(compiled, 1234, examples_per_device=2)
  assert flops == 2 * 8 * 8 * 8 / 2  # XLA counts a multiply-add as 2 FLOPs
  assert '1234 parameters' in caplog.text and 'GFLOP per example' in caplog.text


def test_compile_then_align_calls_on_compiled_once_and_times_the_compile():
  seen = []
  step = loop._CompileThenAlign(jax.jit(lambda x: x + 1), 'step', 10,  # pylint: disable=protected-access
                                on_compiled=seen.append)
  assert step.seconds == 0.0
  assert float(step(jnp.float32(1))) == 2.0
  compiled_in = step.seconds
  assert compiled_in > 0.0
  assert float(step(jnp.float32(2))) == 3.0
  assert len(seen) == 1 and hasattr(seen[0], 'cost_analysis')
  assert step.seconds == compiled_in   # only the first call compiles
