"""Probabilities times values where a key a row cannot see contributes exactly nothing.

``p @ v`` multiplies every value by its probability, including the 0 of a masked key: a NaN or inf value
there turns 0 * NaN or 0 * inf into NaN and leaks into rows that never saw it. ``masked_matmul`` gives the
IEEE result of the sum over *visible* keys only: a visible NaN value gives NaN, a visible +-inf value with
p > 0 gives +-inf (both signs: NaN), a visible inf value whose p underflowed to 0 gives NaN (0 * inf, as the
plain product would), and an invisible one gives nothing. The extra products run only when v holds a
non-finite entry, which is checked first (one pass over v).
"""
from __future__ import annotations

import torch


def has_nonfinite(*tensors) -> bool:
    """True if any of the tensors holds a NaN or an inf (empty tensors hold none).

    One reduction per tensor (a sum is NaN or inf iff a term is, or if finite terms overflow it: then the
    answer is a harmless True, whose callers take their exact slow path), cheaper than isfinite().all()."""
    for t in tensors:
        if t is not None and t.numel():
            acc = torch.float64 if t.dtype == torch.float64 else torch.float32
            if not bool(torch.isfinite(t.sum(dtype=acc))):
                return True
    return False


def masked_matmul(p: torch.Tensor, visible: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """p (..., Sq, Sk) @ v (..., Sk, D) -> (..., Sq, D), summing over visible keys only.

    visible: bool, broadcastable to p (True = the row sees the key), or None (every key visible)."""
    if visible is None or not has_nonfinite(v):
        return p @ v.to(p.dtype)
    fin = torch.isfinite(v)
    out = p @ torch.where(fin, v, torch.zeros((), dtype=v.dtype, device=v.device)).to(p.dtype)
    vis = visible.expand(p.shape)
    ind = lambda m: m.to(p.dtype)  # noqa: E731 -- indicator matrices for counting products
    seen_pos = (p > 0) & vis
    pos = (ind(seen_pos) @ ind(torch.isposinf(v))) > 0
    neg = (ind(seen_pos) @ ind(torch.isneginf(v))) > 0
    nan = (ind(vis) @ ind(torch.isnan(v)) + ind(vis & ~(p > 0)) @ ind(torch.isinf(v))) > 0
    inf = torch.full((), float("inf"), dtype=out.dtype, device=out.device)
    out = torch.where(pos, inf, torch.where(neg, -inf, out))
    return torch.where(nan | (pos & neg), torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
