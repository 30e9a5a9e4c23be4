"""Chip peaks by device_kind and the throughput figures the loop logs."""

import pytest

from segchange_jax.train import mfu


@pytest.mark.parametrize('kind, dtype, peak', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4),
    ('NVIDIA H100 80GB HBM3', 'float32', 494.7),   # TF32 tensor cores
    ('NVIDIA H100 PCIe', 'bfloat16', 756.0),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312.0),
    ('NVIDIA L4', 'bfloat16', 121.0),
    ('TPU v4', 'bfloat16', 275.0),
    ('TPU v5 lite', 'bfloat16', 197.0),
    ('TPU v5', 'float32', 459.0),                  # v5p; default precision: bf16 passes
    ('TPU v6 lite', 'bfloat16', 918.0),
])
def test_peaks_by_device_kind(kind, dtype, peak):
  assert mfu.peak_tflops(kind, dtype) == peak


def test_unknown_device_has_no_peak_and_bad_dtype_is_an_error():
  assert mfu.peak_tflops('cpu', 'float32') is None
  assert mfu.peak_tflops('TPU v5 lite', 'bfloat16') != mfu.peak_tflops('TPU v5p', 'bfloat16')
  with pytest.raises(ValueError, match='float16'):
    mfu.peak_tflops('TPU v4', 'float16')


def test_throughput_and_mfu():
  # 2e12 FLOPs per device step in 0.01 s = 200 TFLOP/s; against a 400 TFLOP/s peak: MFU 0.5.
  assert mfu.throughput(2e12, 0.01, 400.0) == pytest.approx({'tflops_per_device': 200.0,
                                                             'mfu': 0.5})
  assert mfu.throughput(2e12, 0.01, None) == pytest.approx({'tflops_per_device': 200.0})
