"""Standard attention: materialise the scores (the textbook row), and its checkpointed twin."""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from .. import reference
from .spec import AttentionSpec


def standard_attention(q, k, v, spec: AttentionSpec):
    """Materialised attention in q's dtype; autograd keeps the (B, H, Sq, Sk) probabilities.

    q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq).
    """
    sq, sk = q.shape[1], k.shape[1]
    mask = spec.mask.dense(sq, sk, q.device) if spec.mask is not None else None
    bias = spec.dense_bias(sq, sk, q.device)
    out, lse = reference.attention(q, k, v, mask=mask, bias=bias, softmax_scale=spec.scale,
                                   softcap=spec.softcap, return_lse=True)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def checkpointed_attention(q, k, v, spec: AttentionSpec):
    """Standard attention whose probabilities are recomputed in backward, not stored
    (torch.utils.checkpoint, non-reentrant). Same shapes as ``standard_attention``."""
    return torch.utils.checkpoint.checkpoint(standard_attention, q, k, v, spec, use_reentrant=False)
