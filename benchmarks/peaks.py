"""Spec-sheet peak throughput per GPU and precision: the denominator of MFU.

Why a table: no API reports a GPU's peak FLOP rate, and MFU (model FLOPs utilisation, the
field's unit for training efficiency) divides achieved FLOP/s by it. The figures are the
vendors' dense (no 2:4 sparsity) tensor-core rates for bf16/f16 inputs with f32 accumulation,
and the plain (non-tensor, no TF32) FP32 rate for f32, which is what alpha_jit's f32 kernels
and PyTorch's default f32 matmul (TF32 off) run on. A device not listed gets no MFU and the
row says why; add a line here rather than guessing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s of one device per precision name (bf16, f16, f32)."""

    device: str  # the product the figures are for
    tflops: dict[str, float]
    source: str  # where the figures come from


# Matched in order against the lower-cased device name: more specific names first.
_TABLE: tuple[tuple[str, Peak], ...] = (
    ("h200 nvl", Peak("H200 NVL", {"bf16": 835.5, "f16": 835.5, "f32": 60.3},
                      "NVIDIA H200 NVL datasheet (sparse figures halved)")),
    ("h200", Peak("H200 SXM", {"bf16": 989.4, "f16": 989.4, "f32": 66.9},
                  "NVIDIA H200 SXM datasheet (sparse figures halved)")),
    ("h100 nvl", Peak("H100 NVL", {"bf16": 835.5, "f16": 835.5, "f32": 60.0},
                      "NVIDIA H100 NVL datasheet (sparse figures halved)")),
    ("h100 pcie", Peak("H100 PCIe", {"bf16": 756.5, "f16": 756.5, "f32": 51.2},
                       "NVIDIA H100 PCIe datasheet (sparse figures halved)")),
    ("h100", Peak("H100 SXM", {"bf16": 989.4, "f16": 989.4, "f32": 66.9},
                  "NVIDIA H100 SXM datasheet (sparse figures halved)")),
    ("a100", Peak("A100", {"bf16": 312.0, "f16": 312.0, "f32": 19.5},
                  "NVIDIA A100 datasheet")),
    ("l40s", Peak("L40S", {"bf16": 362.05, "f16": 362.05, "f32": 91.6},
                  "NVIDIA L40S datasheet (sparse figures halved)")),
    ("l4", Peak("L4", {"bf16": 121.0, "f16": 121.0, "f32": 30.3},
                "NVIDIA L4 datasheet (sparse figures halved)")),
    ("a10", Peak("A10", {"bf16": 125.0, "f16": 125.0, "f32": 31.2},
                 "NVIDIA A10 datasheet")),
    ("rtx 4090", Peak("GeForce RTX 4090", {"bf16": 165.2, "f16": 165.2, "f32": 82.6},
                      "Ada whitepaper, FP32 accumulate")),
)


def lookup(device_name: str | None) -> Peak | None:
    """The table entry for a device name as Vulkan or CUDA reports it, or None."""
    if not device_name:
        return None
    name = device_name.lower()
    for key, peak in _TABLE:
        if key in name:
            return peak
    return None


def peak_tflops(device_name: str | None, precision: str) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, None) or (None, why there is none) for `precision` on the device."""
    peak = lookup(device_name)
    if peak is None:
        return None, (f"no spec-sheet peak for device {device_name!r} in benchmarks/peaks.py")
    if precision not in peak.tflops:
        return None, f"no {precision} peak for {peak.device} in benchmarks/peaks.py"
    return peak.tflops[precision], None


def mfu(flops: float, seconds: float | None, device_name: str | None,
        precision: str) -> tuple[float | None, str | None]:
    """Achieved FLOP/s over the peak, as a fraction (0.42 = 42 %), or (None, why)."""
    peak, why = peak_tflops(device_name, precision)
    if peak is None:
        return None, why
    if seconds is None or seconds <= 0:
        return None, "no time measured"
    return flops / seconds / (peak * 1e12), None
