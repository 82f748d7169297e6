"""Hardware-utilisation metrics: model FLOPs utilisation (MFU) and peak memory."""
from __future__ import annotations

import resource
import sys

import torch

# Dense peak FLOP/s per device for the precision we train in (bf16/fp16 tensor cores; fp32
# without TF32), from the vendors' datasheets. Matched by substring of the device name, first
# match wins: variants come before the names they contain ("H100 NVL" before "H100", "GB200"
# before "B200", "H200" — which "GH200" contains — before "H20").
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GB200", {"bf16": 2500e12, "fp16": 2500e12, "fp32": 90e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 80e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H800 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H800", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H20", {"bf16": 148e12, "fp16": 148e12, "fp32": 44e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    ("A10G", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
    ("MI300X", {"bf16": 1307e12, "fp16": 1307e12, "fp32": 163e12}),  # ROCm reports AMD devices through torch.cuda
)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak for this precision, or None where MFU means nothing (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device), precision)


def peak_flops_by_name(device_name: str, precision: str) -> float | None:
    for key, table in PEAK_FLOPS:
        if key in device_name:
            return table.get(precision)
    return None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the device's peak (PaLM's definition: no recompute counted)."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s_per_device / peak


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux
