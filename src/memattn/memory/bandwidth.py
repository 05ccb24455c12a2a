"""Measured memory read bandwidth: the ceiling of a batch-1 decode step, which reads every weight once.

``read_bandwidth`` stream-reads a float32 buffer much larger than the last-level cache with all of
torch's intra-op threads (one ``torch.sum`` per pass) and reports the best pass, in GB/s (10^9 bytes/s).
``decode_ceiling`` turns it into tokens/s for a model: read bandwidth / bytes of weights read per step.
"""
from __future__ import annotations

import time

import torch


def read_bandwidth(nbytes: int = 1 << 30, *, repeats: int = 5, device="cpu") -> float:
    """Best-of-`repeats` read bandwidth in GB/s of a sum over a `nbytes` float32 buffer (written once first,
    so its pages are resident). Use a buffer several times the last-level cache (the default 1 GiB)."""
    if nbytes < 4 or repeats < 1:
        raise ValueError(f"nbytes must be >= 4 and repeats >= 1, got {nbytes} and {repeats}")
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buf.sum()  # warm-up: threads started, pages touched
    best = float("inf")
    for _ in range(repeats):
        if buf.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        buf.sum()
        if buf.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters a batch-1 decode step reads: every parameter once (a tied embedding, the same
    tensor as the LM head, counted once; parameters and buffers that share storage are not double counted)."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already yields a shared (tied) parameter once
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def decode_ceiling(model: torch.nn.Module, bandwidth_gb_s: float | None = None) -> float:
    """Tokens/s a batch-1 decode could reach if it only read the weights: bandwidth / weight_bytes."""
    bw = read_bandwidth() if bandwidth_gb_s is None else bandwidth_gb_s
    return bw * 1e9 / weight_bytes(model)


__all__ = ["read_bandwidth", "weight_bytes", "decode_ceiling"]
