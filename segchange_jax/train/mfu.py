"""Peak FLOP rates of accelerators and the throughput figures the training loop logs.

MFU (model FLOPs utilisation) = achieved FLOP/s per chip / the chip's peak FLOP/s for the compute
dtype. Achieved FLOP/s come from XLA's cost analysis of the compiled per-device train step (every
op of forward, backward and update counted) divided by the measured step time; so MFU here is
what MaxText and big_vision report, not the 6 N D estimate of language-model papers.

Peaks are dense (no 2:4 sparsity), per chip, in TFLOP/s, from the vendors' data sheets. TPUs run
float32 matmuls at JAX's default precision as single bf16 passes, so their float32 peak is the
bf16 one; NVIDIA GPUs run them as TF32 on tensor cores (XLA's default), so their float32 peak is
the TF32 one. An unknown device (a CPU included) has no peak: the loop then logs no MFU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense peak TFLOP/s of one chip: bf16 and float32 (as JAX runs float32 matmuls there)."""
  name: str
  bfloat16: float
  float32: float


# Matched against jax.Device.device_kind by substring, first match wins: the more specific
# names (H100 PCIe) come before the general ones (H100).
PEAKS: tuple[tuple[str, Peak], ...] = (
    ('TPU v4', Peak('TPU v4', 275.0, 275.0)),
    ('TPU v5 lite', Peak('TPU v5e', 197.0, 197.0)),
    ('TPU v5e', Peak('TPU v5e', 197.0, 197.0)),
    ('TPU v5p', Peak('TPU v5p', 459.0, 459.0)),
    ('TPU v5', Peak('TPU v5p', 459.0, 459.0)),
    ('TPU v6 lite', Peak('TPU v6e', 918.0, 918.0)),
    ('TPU v6e', Peak('TPU v6e', 918.0, 918.0)),
    ('H100 PCIe', Peak('H100 PCIe', 756.0, 378.0)),
    ('H100', Peak('H100 SXM', 989.4, 494.7)),
    ('A100', Peak('A100', 312.0, 156.0)),
    ('L4', Peak('L4', 121.0, 60.0)),
)

DTYPES = ('bfloat16', 'float32')


def peak_for(device_kind: str) -> Peak | None:
  """The peak of a device by its `device_kind` (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
  for key, peak in PEAKS:
    if key.lower() in device_kind.lower():
      return peak
  return None


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Dense peak TFLOP/s of one `device_kind` chip for compute `dtype`; None when unknown."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype {dtype!r} is not one of {DTYPES}')
  peak = peak_for(device_kind)
  return None if peak is None else getattr(peak, dtype)


def throughput(flops_per_device_step: float, step_time_s: float, peak: float | None
               ) -> dict[str, float]:
  """Achieved TFLOP/s per device and, when the peak is known, MFU (a fraction of it)."""
  achieved = flops_per_device_step / max(step_time_s, 1e-12) / 1e12
  out = {'tflops_per_device': achieved}
  if peak:
    out['mfu'] = achieved / peak
  return out
