"""Analytic memory of each method: the textbook table, in bytes.

The figures count what a method allocates beyond its inputs q, k, v (batch B, length S,
heads H, head dim D, element size e): the output, what is kept for the backward pass and the
largest transient workspace. They are estimates by construction; ``memattn.memory.measure``
gives the real figure.

    method      forward (transient)            kept per layer for backward      backward adds
    standard    2 B H S^2 e (scores, probs)    B H S^2 e (the probabilities)    2 B H S^2 e + grads
    checkpoint  2 B H S^2 e                    nothing beyond the inputs        2 B H S^2 e (recompute) + grads
    blockwise   tile workspace                 out + lse                        tile workspace + grads
    window      tile workspace                 out + lse                        tile workspace + grads
    linear      state B H D^2 4                out + chunk states               state + grads
"""
from __future__ import annotations

import torch

from .._validate import check_positive_int

METHODS = ("standard", "checkpoint", "blockwise", "window", "linear")


def _elt(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate(method: str, batch: int, seqlen: int, heads: int, head_dim: int, dtype=torch.float32,
             backward: bool = False, layers: int = 1, block_size: int = 1024, threads: int | None = None) -> int:
    """Estimated peak bytes for `layers` stacked attention calls (and one backward if asked).

    Args: method in METHODS; batch, seqlen, heads, head_dim: sizes; dtype: element type.
    Returns: bytes (int).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    for name, val in (("batch", batch), ("seqlen", seqlen), ("heads", heads), ("head_dim", head_dim),
                      ("layers", layers), ("block_size", block_size), ("threads", threads)):
        check_positive_int(name, val, allow_none=name == "threads")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    e = _elt(dtype)
    threads = threads or torch.get_num_threads()
    act = batch * seqlen * heads * head_dim * e          # one (B, S, H, D) tensor
    lse = batch * heads * seqlen * 4
    square = batch * heads * seqlen * seqlen * e         # one (B, H, S, S) tensor
    # fused CPU kernel: a 256 x 512 float32 score buffer per thread; our schedule: two query-block accumulators
    tile = threads * min(seqlen, 256) * min(seqlen, 512) * 4 + 2 * batch * min(seqlen, block_size) * heads * head_dim * 4
    state = batch * heads * head_dim * head_dim * 4
    if method in ("standard", "checkpoint"):
        transient = 2 * square
        kept = square + act if method == "standard" else act  # softmax output, reused by probs @ v
    elif method == "linear":
        transient = state + 3 * act  # features of q and k, v with its ones column
        kept = act + (seqlen // 64 + 1) * state
    else:
        transient = tile
        kept = act + lse
    if not backward:
        return int(transient + act if layers == 1 else (layers - 1) * kept + transient + act)
    grads = 3 * act
    recompute = 2 * square if method in ("standard", "checkpoint") else transient
    return int(layers * kept + grads + recompute)
