"""Process-level settings that make CPU training fast: allocator tuning and denormal flushing."""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

__all__ = ["tune_cpu_runtime"]

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
