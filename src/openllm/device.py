"""Where and how PyTorch runs: device, precision, torch.compile, determinism, process group.

Training, evaluation and the benchmarks resolve their settings here, so ``auto`` means the
same thing everywhere: CUDA when present, bf16 autocast where the hardware runs it at full
speed, torch.compile when it can work (a GPU, or a CPU with a C++ compiler).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import OpenLLMError
from .perf import bf16_supported

log = logging.getLogger("openllm.device")


class DeviceError(OpenLLMError):
    """The requested device or compile setting cannot work here."""


@dataclass
class DeviceSetup:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = plain fp32
    compile: bool
    rank: int = 0
    world_size: int = 1

    @property
    def precision_name(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_device(device: str = "auto", precision: str = "auto", compile: str = "false",
                   deterministic: bool = True, distributed: bool = True) -> DeviceSetup:
    """Pick the device, precision and compile setting; join the process group under torchrun.

    ``deterministic`` makes repeated runs bit-identical on one machine, compiled or not:
    torch.compile's CPU kernels otherwise add embedding gradients with atomic adds, in an order
    that changes from run to run.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    if device == "auto":
        chosen = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        chosen = torch.device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device={device} but CUDA is not available here")
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device(f"cuda:{local_rank}")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if precision == "auto":
        dtype = torch.bfloat16 if bf16_supported(chosen) else None
    else:
        dtype = torch.bfloat16 if precision == "bf16" else None
    if compile == "auto":
        # On CPU, torch.compile writes C++ kernels, so it needs a compiler.
        use_compile = chosen.type == "cuda" or (chosen.type == "cpu" and cpp_compiler_available())
    else:
        use_compile = compile == "true"
    set_deterministic(deterministic)
    return DeviceSetup(chosen, dtype, use_compile, rank, world_size)


def set_deterministic(enabled: bool) -> None:
    """Ask PyTorch (and torch.compile) for run-to-run identical results, or stop asking."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def cpp_compiler_available() -> bool:
    """True when the C++ compiler torch.compile looks for on CPU ($CXX, else g++) is on PATH."""
    return shutil.which(os.environ.get("CXX") or "g++") is not None


def compile_model(forward_model: torch.nn.Module, x: torch.Tensor, setup: DeviceSetup,
                  required: bool) -> torch.nn.Module:
    """``torch.compile`` the model and compile it now, on one forward/backward of ``x``.

    Compiling up front means a failure (no working compiler, an unsupported platform) shows
    before training starts: with ``compile: auto`` training then goes on without it; with
    ``true`` it is an error. The gradients of the trial pass are dropped.
    """
    log.info("compiling the model with torch.compile (about half a minute on a small CPU)")
    compiled = torch.compile(forward_model)
    try:
        with setup.autocast():
            logits, _ = compiled(x, use_cache=False)
        logits.float().mean().backward()
    except Exception as exc:  # compiler errors come in many types, from many libraries
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if required:
            raise DeviceError(f"train.compile=true but torch.compile failed: {reason}") from exc
        log.warning("torch.compile failed (%s): training without it (set train.compile=false to skip)", reason)
        return forward_model
    finally:
        forward_model.zero_grad(set_to_none=True)
    return compiled
