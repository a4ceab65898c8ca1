"""What the hardware does fast: used to pick a precision when a config says `auto`."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX, or AVX-512 BF16). Elsewhere torch emulates bf16
    matrix products, which is many times slower than fp32 (measured here on an AVX2-only EPYC: 8x)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_precision(setting: str, device_type: str) -> str:
    """'auto' -> 'bf16' on GPUs that support it and on CPUs with bf16 hardware, 'fp16' on older GPUs, else 'no'."""
    if setting != "auto":
        return setting
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "no"
    return "no"


def precision_reason(device_type: str) -> str:
    """Why `auto` chose what it chose, for the log."""
    if device_type == "cuda":
        return "GPU with bf16" if torch.cuda.is_bf16_supported() else "GPU without bf16"
    flags = sorted({"amx_bf16", "avx512_bf16"} & cpu_flags())
    return f"CPU with {', '.join(flags)}" if flags else "CPU without bf16 hardware: bf16 would be emulated, slower"
