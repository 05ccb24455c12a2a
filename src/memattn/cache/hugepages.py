"""KV pools backed by transparent huge pages where the OS offers them (Linux, THP in "madvise" mode or on).

Why: paged attention reads blocks in a random order over a pool of hundreds of MiB. With 4 KiB pages every
block touches fresh pages whose translations miss the TLB; with 2 MiB pages a whole region of blocks shares
one translation, so random block reads get faster (measured in BENCHMARKS.md, "Paged decode"). Sequential
readers (SDPA on a contiguous cache) gain little.
"""
from __future__ import annotations

import ctypes
import sys

import torch

_MADV_HUGEPAGE = 14
_HUGE = 2 << 20


def _madvise_huge(t: torch.Tensor) -> bool:
    """Advise the kernel to back t's storage with huge pages (before it is touched). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // _HUGE) * _HUGE, end // _HUGE * _HUGE  # the 2 MiB-aligned interior
    if hi <= lo:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def zeros(shape, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """torch.zeros(shape), on the CPU with its pages advised huge before they are first written."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype)
    _madvise_huge(t)
    return t.zero_()
