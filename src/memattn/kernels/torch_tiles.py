"""The tile primitive in plain PyTorch: the algorithm as the papers write it, any dtype.

A tile is a block of queries against a block of keys. The forward returns the tile's
normalised output and its log-sum-exp, so tiles that saw disjoint keys can be merged
(see ``memattn.merge_attention``). The backward recomputes the tile's probabilities from
the *global* lse and uses the global ``delta = rowsum(dO * O) - dlse`` (FlashAttention-2),
so it never needs anything but the tile.

Layouts: q (B, tq, H, D), k/v (B, tk, Hkv, D), lse/delta (B, H, tq). GQA: query head h
reads kv head h // (H // Hkv). Masks/bias broadcast to (B, H, tq, tk).
"""
from __future__ import annotations

import torch

from .._finite import has_nonfinite, masked_matmul


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    # (B, tq, H, D) -> (B, tq, Hkv, G, D): query head h = hkv_index * G + g
    b, s, h, d = q.shape
    return q.reshape(b, s, hkv, h // hkv, d)


def _as_heads(x: torch.Tensor, h: int) -> torch.Tensor:
    # (B, Hkv, G, tq, tk) -> (B, H, tq, tk)
    b, hkv, g, sq, sk = x.shape
    return x.reshape(b, h, sq, sk)


def _scores(q, k, scale, mask, bias, softcap, causal):
    """Scores (B, H, tq, tk) in the compute dtype, plus tanh(raw/softcap) for the backward."""
    cd = compute_dtype(q.dtype)
    h, hkv = q.shape[2], k.shape[2]
    s = torch.einsum("bqhgd,bkhd->bhgqk", _grouped(q, hkv).to(cd), k.to(cd))
    s = _as_heads(s, h) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if bias is not None:
        s = s + bias.to(cd)
    if causal:
        tq, tk = s.shape[-2:]
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, t


def tile_forward(q, k, v, *, scale, mask=None, bias=None, softcap=0.0, causal=False):
    """One tile of attention.

    Args: q (B, tq, H, D); k, v (B, tk, Hkv, D); mask bool broadcastable to (B, H, tq, tk),
    True = visible; bias float, same broadcast; causal=True adds a top-left triangle inside the
    tile (the tile's query i sees tile key j iff j <= i).
    Returns: out (B, tq, H, D) and lse (B, H, tq), both in the compute dtype (float32, or
    float64 for float64 input). A row with no visible key gives out 0 and lse -inf.
    """
    s, _ = _scores(q, k, scale, mask, bias, softcap, causal)
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)  # no key: as masked
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # empty rows: exp(-inf - 0) = 0
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    b, hkv = q.shape[0], k.shape[2]
    g = q.shape[2] // hkv
    p5 = p.reshape(b, hkv, g, p.shape[-2], p.shape[-1])
    if (mask is not None or causal) and has_nonfinite(v):  # a masked NaN/inf value must not leak (0 * NaN)
        vis = _visible(mask, causal, p.shape, p.device).reshape(p5.shape)
        o5 = masked_matmul(p5, vis, v.transpose(1, 2).unsqueeze(2))           # (B, Hkv, G, tq, D)
        return o5.permute(0, 3, 1, 2, 4).reshape(*q.shape[:3], v.shape[-1]), lse
    out = torch.einsum("bhgqk,bkhd->bqhgd", p5, v.to(p.dtype)).reshape(*q.shape[:3], v.shape[-1])
    return out, lse


def _visible(mask, causal, shape, device):
    """The tile's visibility (B, H, tq, tk) bool: its mask and top-left causal triangle."""
    vis = torch.ones(shape[-2:], dtype=torch.bool, device=device)
    if causal:
        vis = vis.tril()
    return (vis if mask is None else vis & mask).expand(shape)


def tile_backward(dout, q, k, v, out, lse, delta, *, scale, mask=None, bias=None, softcap=0.0, causal=False):
    """Gradients of one tile given the global lse and delta.

    Args: dout (B, tq, H, D); lse, delta (B, H, tq) over *all* keys of these rows
    (delta = rowsum(dout * out) - dlse); `out` is unused here (kept for one signature with the
    fused tile). Returns dq (B, tq, H, D), dk, dv (B, tk, Hkv, D) in the compute dtype.
    """
    cd = compute_dtype(q.dtype)
    s, t = _scores(q, k, scale, mask, bias, softcap, causal)
    lse = lse.to(cd)
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - lse_safe.unsqueeze(-1))  # masked scores are -inf -> p = 0
    unseen = None
    if has_nonfinite(lse_safe):  # a NaN row: exp(-inf - NaN) is NaN, yet a key it cannot see gets no gradient
        unseen = torch.isneginf(s)
        p = p.masked_fill(unseen, 0.0)
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    p5 = p.reshape(b, hkv, g, tq, tk)
    do5 = _grouped(dout, hkv).to(cd)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p5, do5)
    dp = _as_heads(torch.einsum("bqhgd,bkhd->bhgqk", do5, v.to(cd)), h)
    ds = p * (dp - delta.to(cd).unsqueeze(-1))
    if unseen is not None:  # and 0 * (dp - NaN delta) must stay 0 there
        ds = ds.masked_fill(unseen, 0.0)
    if t is not None:
        ds = ds * (1 - t * t)  # d/dx [c * tanh(x / c)] = 1 - tanh^2
        if has_nonfinite(t):  # tanh(NaN) of a masked score: 0 * NaN must stay 0 where the row cannot see
            ds = ds.masked_fill(torch.isneginf(s), 0.0)
    ds5 = ds.reshape(b, hkv, g, tq, tk)
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds5, k.to(cd)).reshape(b, tq, h, d) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds5, _grouped(q, hkv).to(cd)) * scale
    return dq, dk, dv
