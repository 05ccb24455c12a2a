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

    @property
    def translation_invariant(self) -> bool:
        """True if mask and bias depend on i - j alone (one tile pattern serves a whole band of tiles)."""
        return ((self.mask is None or self.mask.translation_invariant)
                and (self.alibi_slopes is None or self.alibi_slopes.dim() == 1))

    def tile_bias(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None, sequence: int | None = None):
        """ALiBi bias of one tile, (B|1, H, tq, tk) float32, or None. `sequence` picks one row of
        (B, H) slopes (packed variable-length input, where each sequence is its own problem)."""
        if self.alibi_slopes is None:
            return None
        i = torch.arange(q0, q1, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)
        j = torch.arange(k0, k1, device=device).unsqueeze(0)
        dist = (i - j).abs().to(torch.float32)
        slopes = self.alibi_slopes.to(torch.float32)
        if sequence is not None and slopes.dim() == 2:
            slopes = slopes[sequence]
        slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(*slopes.shape, 1, 1)
        return -slopes * dist

    def dense_bias(self, seqlen_q, seqlen_k, device=None):
        return self.tile_bias(seqlen_q, seqlen_k, 0, seqlen_q, 0, seqlen_k, device)
