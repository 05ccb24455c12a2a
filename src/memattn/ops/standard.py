"""Standard attention: materialise the scores (the textbook row), and its checkpointed twin.

This is the lean version a framework would run (PyTorch's MATH backend does the same):
scale folded into q, one score matrix, an in-place mask, ``softmax`` (autograd keeps only its
output), then ``probs @ v``. ``memattn.reference.attention`` is the readable oracle beside it.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from .._finite import has_nonfinite, masked_matmul
from ..kernels.torch_tiles import compute_dtype
from .spec import AttentionSpec


def standard_attention(q, k, v, spec: AttentionSpec, return_lse: bool = True):
    """Materialised attention in q's dtype; autograd keeps the (B, H, Sq, Sk) probabilities.

    q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq) (None unless return_lse).
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qh = (q * spec.scale).transpose(1, 2)                             # (B, H, Sq, D)
    kh = k.transpose(1, 2).repeat_interleave(h // hkv, dim=1) if h != hkv else k.transpose(1, 2)
    vh = v.transpose(1, 2).repeat_interleave(h // hkv, dim=1) if h != hkv else v.transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2)                                # (B, H, Sq, Sk)
    mask = spec.mask.dense(sq, sk, q.device) if spec.mask is not None else None
    if spec.softcap:
        if mask is not None:  # a masked NaN score must not reach tanh's gradient (0 * NaN there is NaN)
            scores = scores.masked_fill(~mask, 0.0)
        # in float32, rounded once: three half-precision roundings here put it outside the FA rule
        scores = (spec.softcap * torch.tanh(scores.to(compute_dtype(scores.dtype)) / spec.softcap)).to(scores.dtype)
    bias = spec.dense_bias(sq, sk, q.device)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    visible_rows = None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if spec.mask is not None or has_nonfinite(q, k):
        # a row sees a key if some score is above -inf (an inf input can make a visible score -inf too)
        rows = ~torch.isneginf(scores).all(-1, keepdim=True)
        if not bool(rows.all()):
            visible_rows = rows
            # a row with no visible key would give softmax NaN: give it finite scores, zero it after
            scores = scores.masked_fill(~rows, 0.0)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(scores.to(lse_dtype), dim=-1) if return_lse else None
    probs = torch.softmax(scores, dim=-1)
    if visible_rows is not None:
        probs = probs * visible_rows
        if lse is not None:
            lse = lse.masked_fill(~visible_rows.squeeze(-1), float("-inf"))
    out = masked_matmul(probs, mask, vh).transpose(1, 2)              # (B, Sq, H, D); masked NaN values stay out
    return out, lse


def checkpointed_attention(q, k, v, spec: AttentionSpec, return_lse: bool = True):
    """Standard attention whose probabilities are recomputed in backward, not stored
    (torch.utils.checkpoint, non-reentrant). Same shapes as ``standard_attention``."""
    return torch.utils.checkpoint.checkpoint(standard_attention, q, k, v, spec, return_lse, use_reentrant=False)
