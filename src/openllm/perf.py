"""Measuring the machine: matmul throughput, the yardstick for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0,
                 device: str | torch.device = "cpu") -> float:
    """Sustained FLOP/s of a square ``size`` x ``size`` matmul in ``dtype`` on ``device``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(2):  # warm up kernels and caches
        a @ b
    sync()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    sync()
    return 2 * size**3 * runs / (time.perf_counter() - started)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the measured peak."""
    return tokens_per_second * flops_per_token / peak_flops


def peak_matmul_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.0) -> float:
    """The best sustained matmul FLOP/s over a few sizes: the machine's practical limit."""
    return max(matmul_flops(dtype, size, seconds, device) for size in sizes)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs at full speed here: CUDA with bf16, or a CPU with AVX-512."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and "AVX512" in torch.backends.cpu.get_cpu_capability()


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint() -> dict[str, Any]:
    """The hardware and libraries a result was computed with (results may differ across them)."""
    return {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
