"""What a call asks for, beyond q/k/v: scale, mask, score modifiers. Built once, validated, passed down."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import Mask


@dataclass(frozen=True)
class AttentionSpec:
    """scale: softmax scale; mask: a ``memattn.masks.Mask`` or None; softcap: 0 = off;
    alibi_slopes: float32 (H,) or (B, H) or None (bias -slope * |i + Sk - Sq - j|)."""

    scale: float
    mask: Mask | None = None
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None

    def tile_bias(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        """ALiBi bias of one tile, (B|1, H, tq, tk) float32, or None."""
        if self.alibi_slopes is None:
            return None
        i = torch.arange(q0, q1, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)
        j = torch.arange(k0, k1, device=device).unsqueeze(0)
        dist = (i - j).abs().to(torch.float32)
        slopes = self.alibi_slopes.to(torch.float32)
        slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(*slopes.shape, 1, 1)
        return -slopes * dist

    def dense_bias(self, seqlen_q, seqlen_k, device=None):
        return self.tile_bias(seqlen_q, seqlen_k, 0, seqlen_q, 0, seqlen_k, device)
