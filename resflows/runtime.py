"""Process-level settings: CPU allocator tuning and denormal flushing, and the training precision
(``--precision``: TF32 switches, the bfloat16 branches' dtype, what the device can do)."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Iterator, List, Optional

import torch

__all__ = ["tune_cpu_runtime", "PRECISIONS", "compute_dtype", "set_tf32", "full_float32", "cpu_bf16_flags",
           "check_precision"]

PRECISIONS = ("fp32", "tf32", "bf16")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit on 64-bit systems


def tune_cpu_runtime() -> bool:
    """Flush float32 denormals and keep freed activation buffers in glibc's heap.

    PyTorch's CPU allocator hands every tensor straight to malloc. With glibc's defaults, buffers of a few
    MB are mmap-ed and unmapped on every allocation, so each element-wise op of a training step pays
    thousands of page faults. A fixed mmap threshold of 32 MB and no trimming let freed buffers be reused;
    the live memory of a step is the same. What this and the denormal flushing gained is measured in
    benchmarks/README.md ("Page faults", "Denormals"). Returns whether glibc accepted the settings.
    """
    torch.set_flush_denormal(True)  # float32 denormals are slow on CPUs (the EMA validation: benchmarks/README.md)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**30) == 1 and ok
    return ok


# ------------------------------------------------------------------------------------------------
# Training precision. Evaluation, validation, sampling and reconstructions are float32 whatever it is:
# the trainers apply it to the training step only (resflows.layers.precision.branch_dtype for bf16) and
# switch TF32 off around evaluation (full_float32).
# ------------------------------------------------------------------------------------------------
def compute_dtype(precision: str) -> Optional[torch.dtype]:
    """The residual branches' dtype in a training step under ``--precision`` (None: float32)."""
    return torch.bfloat16 if precision == "bf16" else None


def set_tf32(enabled: bool) -> None:
    """TF32 for cuDNN convolutions and CUDA matrix products (torch's cuDNN default is on: set both always)."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off inside (evaluation under ``--precision tf32``), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cpu_bf16_flags() -> List[str]:
    """This CPU's native bfloat16 instruction sets, from /proc/cpuinfo (x86: avx512_bf16, amx_bf16; Arm:
    bf16); empty where there are none or the file is absent (torch then emulates bfloat16 arithmetic)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    words.update(line.split(":", 1)[1].split())
    except OSError:
        return []
    return [w for w in ("avx512_bf16", "amx_bf16", "bf16") if w in words]


def check_precision(precision: str, device: torch.device) -> str:
    """The start-of-run line saying what ``--precision`` does on ``device``; ValueError (one line, naming
    the flag) where the device cannot do it."""
    if precision == "fp32":
        return "precision fp32: full float32 (TF32 off)"
    if precision == "tf32":
        if device.type != "cuda":
            return f"precision tf32: TF32 exists on CUDA GPUs only; on {device.type} this is full float32"
        return "precision tf32: TF32 cuDNN convolutions and CUDA matrix products in training; evaluation in float32"
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"--precision bf16: {name} cannot compute in bfloat16 (it needs compute capability 8.0 "
                             f"or newer, e.g. an A100); use --precision tf32 or fp32")
        where = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        flags = cpu_bf16_flags()
        where = (f"CPU with native bf16 instructions ({', '.join(flags)})" if flags else
                 "CPU without native bf16 instructions: torch emulates them, expect it slower than fp32")
    else:
        raise ValueError(f"--precision bf16 runs on CUDA GPUs and CPUs, not on {device.type}; use --precision fp32")
    return (f"precision bf16: residual-branch convolutions and linear layers in bfloat16 on {where}; "
            f"residual stream, log-det, loss and evaluation in float32")
