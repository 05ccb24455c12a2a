"""The log-sum-exp merge of partial attention results that saw disjoint keys, written once.

Partial i of a row has a normalised output ``out_i`` and log-sum-exp ``lse_i`` (-inf where it saw
no key). Over their union::

    lse = log sum_i exp(lse_i)        out = sum_i exp(lse_i - lse) * out_i

computed stably around m = max_i lse_i (taken as 0 where every part is -inf, so rows that no
part saw give out 0 and lse -inf, never NaN). Partials come in two arrangements, which differ
only in how they reduce over the parts:

- stacked along a dimension (``merge_partials``; ``merge_weights`` for callers that keep their
  outputs apart, such as the pairwise ``memattn.merge_attention``);
- rows tagged with the row they belong to, a varying number each (``merge_segments``: the
  zero-copy pool schedule, reduced with ``scatter_reduce`` / ``index_add_``).
"""
from __future__ import annotations

import torch


class _Stacked:
    """Parts stacked along `dim` of the lse tensor."""

    def __init__(self, dim):
        self.dim = dim

    def max(self, lse):
        return lse.amax(self.dim, keepdim=True)

    def sum(self, w):
        return w.sum(self.dim, keepdim=True)

    def spread(self, per_row):  # per-row values back onto the parts: broadcasting does it
        return per_row


class _Segments:
    """Part row i belongs to output row ``rows[i]`` of `n`; lse (parts, H)."""

    def __init__(self, rows, n):
        self.rows, self.n = rows, n

    def max(self, lse):
        m = torch.full((self.n, lse.shape[1]), float("-inf"), dtype=lse.dtype, device=lse.device)
        return m.scatter_reduce_(0, self.rows.unsqueeze(1).expand_as(lse), lse, reduce="amax")

    def sum(self, w):
        return torch.zeros((self.n, w.shape[1]), dtype=w.dtype, device=w.device).index_add_(0, self.rows, w)

    def spread(self, per_row):
        return per_row.index_select(0, self.rows)


def _weights(lse, parts):
    """(coefficients exp(lse_i - lse) shaped like lse: 0 for parts that saw nothing, merged lse)."""
    m = parts.max(lse)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - parts.spread(m))  # exp(-inf) = 0 for parts that saw nothing
    total = parts.sum(w)
    merged = m + torch.log(total)  # total 0 -> -inf
    inv = 1 / torch.where(total == 0, torch.ones_like(total), total)
    return w * parts.spread(inv), merged


def merge_weights(lse, dim):
    """lse (..., P, ...) of P parts stacked along `dim` -> (coefficients shaped like lse, merged lse
    with `dim` kept as size 1). The merged output is sum over `dim` of coefficient * out."""
    return _weights(lse, _Stacked(dim))


def merge_partials(out, lse, dim):
    """Merge parts stacked along `dim`: out (..., P, ..., D), lse shaped ``out.shape[:-1]``
    -> out with `dim` removed (..., D), lse with `dim` removed."""
    if out.shape[dim] == 1:  # nothing to merge (exactly: its coefficient is 1 or, unseen, 0 on an out of 0)
        return out.squeeze(dim), lse.squeeze(dim)
    c, merged = merge_weights(lse, dim)
    return (c.unsqueeze(-1) * out).sum(dim), merged.squeeze(dim)


def merge_segments(parts, n):
    """Merge row results ``[(out (m, H, D), lse (m, H), rows (m,))]``, at least one, into n rows
    (out row ``rows[i]`` gets part row i; rows must lie in [0, n)). Returns out (n, H, D),
    lse (n, H). Each part's out is scaled in place and index-added: no concatenated copy of outs."""
    o0, l0, _ = parts[0]
    c, merged = _weights(torch.cat([l for _, l, _ in parts]), _Segments(torch.cat([r for _, _, r in parts]), n))
    out = torch.zeros((n, *o0.shape[1:]), dtype=l0.dtype, device=l0.device)
    for (o, _, rows), ci in zip(parts, c.split([r.numel() for _, _, r in parts])):
        o = o if o.is_contiguous() else o.contiguous()
        out.index_add_(0, rows, o.mul_(ci.unsqueeze(2)))
    return out, merged


__all__ = ["merge_partials", "merge_weights", "merge_segments"]
