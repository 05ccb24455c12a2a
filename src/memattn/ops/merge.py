"""Stable merge of two partial attention results that saw disjoint sets of keys (the public pairwise
form of ``kernels.merge``'s formula, which merges any number)."""
from __future__ import annotations

import torch



def merge_attention(out_a, lse_a, out_b, lse_b):
    """Merge two partial attentions over disjoint keys into the attention over their union.

    Args:
        out_a, out_b: (..., S, H, D) normalised partial outputs (e.g. (B, S, H, D)).
        lse_a, lse_b: (..., H, S) their log-sum-exps (-inf where a part saw no key).
    Returns:
        out (..., S, H, D) in the promoted dtype of the outputs and at least float32 precision,
        lse (..., H, S). Rows that neither part saw give out 0 and lse -inf, never NaN.
    """
    if out_a.shape != out_b.shape:
        raise ValueError(f"out shapes differ: {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    if lse_a.shape != lse_b.shape:
        raise ValueError(f"lse shapes differ: {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}")
    if lse_a.dim() != out_a.dim() - 1 or lse_a.shape[-1] != out_a.shape[-3] or lse_a.shape[-2] != out_a.shape[-2]:
        raise ValueError(
            f"lse shape {tuple(lse_a.shape)} does not match out shape {tuple(out_a.shape)}: "
            "expected lse (..., H, S) for out (..., S, H, D)")
    # The pairwise form of kernels.merge's formula, written out elementwise: the schedules call it once per
    # extra key segment of a query block (many times under block-sparse masks), and stacking the two lse
    # for the N-way form measurably slowed those (bigbird forward ~10%, benchmarks/results/ab_issue12.json).
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    lse = m + torch.log(total)  # total 0 (neither part saw a key) -> -inf
    total = torch.where(total == 0, torch.ones_like(total), total)
    # (..., H, S) -> (..., S, H, 1) to scale the outputs
    ca = (wa / total).transpose(-1, -2).unsqueeze(-1)
    cb = (wb / total).transpose(-1, -2).unsqueeze(-1)
    return out_a * ca + out_b * cb, lse
