"""The oracle: materialised attention with an explicit dense mask and bias, written to be read.

Tests run it in float64 (the oracle) and in the dtype of the path under test (``naive_T`` of
FlashAttention's tolerance rule). It is not the ``standard`` method: that one is a lean
materialising implementation of its own (``ops/standard.py``), checked against this.
"""
from __future__ import annotations

import torch

from ._validate import check_dense_qkv, resolve_scale


def attention(q, k, v, *, mask=None, bias=None, softmax_scale=None, softcap=0.0, return_lse=False):
    """Materialised softmax attention, computed in q's dtype.

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D), H % Hkv == 0 (query head h reads kv head h // (H // Hkv)).
        mask: bool, broadcastable to (B, H, Sq, Sk), True = visible. None = all visible.
        bias: float, broadcastable to (B, H, Sq, Sk), added to the (softcapped) scores.
        softmax_scale: default 1 / sqrt(D). softcap: scores -> softcap * tanh(scores / softcap); 0 = off.
    Returns:
        out (B, Sq, H, D) and, with return_lse, lse (B, H, Sq) (natural log; -inf for rows
        with no visible key, whose output is 0).
    """
    check_dense_qkv(q, k, v)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m).detach()
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse
