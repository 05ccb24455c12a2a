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


def merge_sinks(out, lse, sinks):
    """Fold learnable attention sinks (gpt-oss) into a finished attention result.

    A sink is one extra logit per query head that joins the softmax denominator and carries no
    value: a partial result with out 0 and lse = sink. Merging it (the same formula as
    ``merge_attention``) gives

        lse' = logaddexp(lse, sink)        out' = out * exp(lse - lse') = out * sigmoid(lse - sink)

    Rows that saw no key (lse -inf) stay out 0, with lse' = sink (-inf for a -inf sink); a +inf sink
    gives NaN rows (lse' +inf), as the materialised sink column does. Differentiable in out, lse and
    sinks: d sink = sum over rows of p_sink * (dlse' - rowsum(dO' * out')), p_sink = exp(sink - lse').

    Args:
        out: (..., S, H, D) normalised attention output (dense (B, S, H, D) or packed (T, H, D)).
        lse: (..., H, S) its log-sum-exp (natural log).
        sinks: (H,) float, one logit per query head.
    Returns:
        out' (..., S, H, D) in out's dtype (scaled in lse's dtype), lse' (..., H, S) in lse's dtype.
    """
    s = sinks.to(lse.dtype).unsqueeze(-1).expand_as(lse)  # (H, 1) broadcasts over (..., H, S)
    # a row that saw no key with a sink of -inf saw nothing at all: out 0, lse -inf, as without the sink
    # (logaddexp(-inf, -inf)'s exp(-inf - -inf) is NaN, forward and backward: kept out of both)
    empty = torch.isneginf(lse) & torch.isneginf(s)
    merged = torch.logaddexp(lse.masked_fill(empty, 0.0), s.masked_fill(empty, 0.0)).masked_fill(empty, float("-inf"))
    keep = torch.exp(lse - merged.masked_fill(empty, 0.0))  # sigmoid(lse - sink); 0 where lse is -inf
    # a +inf sink is a fault to show, not a weight that silences the row: every row of its head is NaN, as
    # the oracle's softmax is there (its sink column's weight is exp(inf - inf))
    keep = keep.masked_fill(torch.isposinf(s), float("nan"))
    return (out.to(lse.dtype) * keep.transpose(-1, -2).unsqueeze(-1)).to(out.dtype), merged
