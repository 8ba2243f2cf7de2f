"""Model FLOPs per train step, peak FLOP/s per device, and MFU (model FLOPs utilisation).

FLOPs per step come from the compiled train step's XLA `cost_analysis()` (per device after
SPMD partitioning, so multiplied by the device count), falling back to the analytic
`6 * parameters * tokens` (forward + backward of a dense model) when XLA reports none.
MFU = achieved FLOP/s / (peak FLOP/s per device * devices); omitted for devices whose peak
is unknown (CPU): then only the achieved FLOP/s is reported.
"""

from __future__ import annotations

import re
from typing import Any

# Dense bf16 peak FLOP/s per device (per chip for TPU), from the vendors' data sheets.
# Matched in order against the lower-cased `device.device_kind`.
PEAK_FLOPS_BY_KIND: tuple[tuple[str, float], ...] = (
    (r"h200", 989e12),
    (r"h100", 989e12),
    (r"a100", 312e12),
    (r"v6\s*e|v6\s*lite", 918e12),  # Trillium ("TPU v6 lite")
    (r"v5\s*p", 459e12),
    (r"v5\s*e|v5\s*lite", 197e12),  # "TPU v5 lite"
    (r"tpu\s*v5$", 459e12),  # "TPU v5" is v5p
    (r"tpu\s*v4", 275e12),
)


def peak_flops_per_device(device_kind: str | None) -> float | None:
  """Peak dense bf16 FLOP/s of one device of this kind; None when unknown (CPU, other)."""
  kind = (device_kind or "").strip().lower()
  for pattern, peak in PEAK_FLOPS_BY_KIND:
    if re.search(pattern, kind):
      return peak
  return None


def cost_analysis_flops(compiled: Any) -> float | None:
  """FLOPs of one execution of a compiled (AOT) computation *per device*, from XLA's cost
  analysis; None when XLA reports none (some backends) or it fails."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backend without cost analysis
    return None
  if isinstance(ca, (list, tuple)):  # older jax: one dict per partition/program
    ca = ca[0] if ca else None
  if not ca:
    return None
  flops = ca.get("flops")
  return float(flops) if flops and flops > 0 else None


def analytic_train_flops(num_params: int, tokens_per_step: int) -> float:
  """6 * N * T: forward (2 N T) and backward (4 N T) of a dense model."""
  return 6.0 * float(num_params) * float(tokens_per_step)


def train_step_flops(compiled: Any, num_devices: int, *, num_params: int, tokens_per_step: int) -> tuple[float, str]:
  """Global model FLOPs of one train step and where the number came from ('xla' | 'analytic')."""
  per_device = cost_analysis_flops(compiled)
  if per_device is not None:
    return per_device * num_devices, "xla"
  return analytic_train_flops(num_params, tokens_per_step), "analytic"


def utilization(flops_per_step: float, step_seconds: float, num_devices: int,
                device_kind: str | None) -> dict[str, float]:
  """{'flops_per_s': achieved global FLOP/s, 'mfu': fraction of peak (only when the peak is known)}."""
  out = {"flops_per_s": flops_per_step / max(step_seconds, 1e-12)}
  peak = peak_flops_per_device(device_kind)
  if peak:
    out["mfu"] = out["flops_per_s"] / (peak * num_devices)
  return out
