"""The oracles, written to be read: materialised attention with an explicit dense mask and bias
(``attention``), and paged attention over keys gathered token by token through the block table
(``paged_attention``).

Tests run them in float64 (the oracle) and in the dtype of the path under test (``naive_T`` of
FlashAttention's tolerance rule). ``attention`` is not the ``standard`` method: that one is a lean
materialising implementation of its own (``ops/standard.py``), checked against this.
"""
from __future__ import annotations

import torch

from ._finite import masked_matmul
from ._validate import check_dense_qkv, check_window, resolve_scale


def attention(q, k, v, *, mask=None, bias=None, softmax_scale=None, softcap=0.0, return_lse=False, sinks=None):
    """Materialised softmax attention, computed in q's dtype.

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D), H % Hkv == 0 (query head h reads kv head h // (H // Hkv)).
        mask: bool, broadcastable to (B, H, Sq, Sk), True = visible. None = all visible.
        bias: float, broadcastable to (B, H, Sq, Sk), added to the (softcapped) scores.
        softmax_scale: default 1 / sqrt(D). softcap: scores -> softcap * tanh(scores / softcap); 0 = off.
        sinks: (H,) learnable sink logits: one more score column per head, always visible, whose
            value is 0 (it only joins the softmax denominator).
    Returns:
        out (B, Sq, H, D) and, with return_lse, lse (B, H, Sq) (natural log; -inf for rows
        with no visible key, whose output is 0; with sinks such a row has lse = sink).
    """
    check_dense_qkv(q, k, v)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        if mask is not None:  # a masked NaN score must not reach tanh's gradient (0 * NaN there is NaN)
            s = s.masked_fill(~mask, 0.0)
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    sk = s.shape[-1]
    if sinks is not None:  # the materialised sink: one more score column, whose value row is zero
        s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    # no key at all (Sk = 0): the max of nothing is taken as 0, like that of a fully masked row
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m).detach()
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    # a masked key's value contributes nothing, even a NaN or inf one (0 * NaN would leak it)
    # (the sink column, if any, is left out: its value row is zero)
    out = masked_matmul(p[..., :sk], mask, v.transpose(1, 2)).transpose(1, 2)
    # a row whose softmax is undefined (NaN denominator: a +inf sink, exp(inf - inf)) is NaN even where it
    # sums no value (no key, or only masked ones): the fault shows in every row it touches
    out = out.masked_fill(torch.isnan(denom).transpose(1, 2), float("nan"))
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse


def paged_attention(q, key_cache, value_cache, block_table, cache_seqlens, *, cu_seqlens_q=None,
                    softmax_scale=None, causal=True, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                    return_lse=False, sinks=None):
    """``memattn.paged_attention`` the slow, obvious way, computed in q's dtype: the oracle of the
    paged tests (run it in float64). Same arguments and results; inputs are assumed valid.

    Every key is gathered token by token through the block table into a contiguous tensor, then
    the dense mask and bias are built and ``attention`` runs on them. Sequence b with Lq queries
    and L = cache_seqlens[b] keys has query i at position p = i + L - Lq: key j is visible iff
    p - left <= j <= p + right (window_size; causal caps right at 0), with ALiBi bias
    -slope * |p - j| (float32 slopes and distances, as ``memattn.paged_attention`` adds them).
    sinks: (H,) sink logits, joining every row's softmax (``attention``'s sinks).
    """
    left, right = check_window(window_size)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    packed = cu_seqlens_q is not None
    h, d = q.shape[-2:]
    qp = q if packed else q.reshape(-1, h, d)
    batch, bs, hkv = block_table.shape[0], key_cache.shape[1], key_cache.shape[2]
    cu = cu_seqlens_q.tolist() if packed else [b * q.shape[1] for b in range(batch + 1)]
    out = torch.zeros(qp.shape, dtype=qp.dtype, device=qp.device)
    lse = torch.full((h, qp.shape[0]), float("-inf"), dtype=qp.dtype, device=qp.device)
    flat_k, flat_v = key_cache.reshape(-1, hkv, d), value_cache.reshape(-1, hkv, d)
    for b in range(batch):
        q0, lq, lk = cu[b], cu[b + 1] - cu[b], int(cache_seqlens[b])
        if lq == 0:
            continue
        slots = [int(block_table[b, j // bs]) * bs + j % bs for j in range(lk)]
        p = torch.arange(lq, device=qp.device).unsqueeze(1) + (lk - lq)
        j = torch.arange(lk, device=qp.device).unsqueeze(0)
        mask = torch.ones((lq, lk), dtype=torch.bool, device=qp.device)
        if left >= 0:
            mask &= j >= p - left
        if right >= 0:
            mask &= j <= p + right
        bias = None
        if alibi_slopes is not None:
            slopes = alibi_slopes.to(torch.float32)
            slopes = slopes[b] if slopes.dim() == 2 else slopes
            bias = -slopes.view(1, h, 1, 1) * (p - j).abs().to(torch.float32)
        o, l = attention(qp[q0:q0 + lq].unsqueeze(0), flat_k[slots].unsqueeze(0), flat_v[slots].unsqueeze(0),
                         mask=mask, bias=bias, softmax_scale=resolve_scale(softmax_scale, d), softcap=softcap,
                         return_lse=True, sinks=sinks)
        out[q0:q0 + lq], lse[:, q0:q0 + lq] = o[0], l[0]
    if packed:
        return (out, lse) if return_lse else out
    out = out.view(batch, q.shape[1], h, d)
    return (out, lse.view(h, batch, q.shape[1]).permute(1, 0, 2)) if return_lse else out
