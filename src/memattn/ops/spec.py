"""What a call asks for, beyond q/k/v: scale, mask, score modifiers. Built once, validated, passed down."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import check_key_padding_mask, check_window, resolve_scale
from ..masks import DenseMask, KeyPaddingMask, Mask, WindowMask, combine


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


def build_spec(q_shape, seqlen_k: int, *, causal, softmax_scale, key_padding_mask, window_size=(-1, -1),
               alibi_slopes=None, softcap=0.0, mask=None, num_sequences=None, device=None) -> AttentionSpec:
    """Validate the masking arguments and fold them into one AttentionSpec.

    q_shape: (batch, seqlen_q, heads, head_dim) of the queries; seqlen_k: keys per sequence.
    num_sequences: the batch that (batch, heads) ALiBi slopes index (packed input: the sequence count).
    device: where a key_padding_mask must live (None: not checked)."""
    b, sq, h, d = q_shape
    nb = b if num_sequences is None else num_sequences
    sk = seqlen_k
    scale = resolve_scale(softmax_scale, d)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_key_padding_mask(key_padding_mask, b, sk, device)
    left, right = check_window(window_size)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0 = off), got {softcap!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    structural = None if (left, right) == (-1, -1) else WindowMask(left, right)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a tensor, got {type(alibi_slopes).__name__}")
        if tuple(alibi_slopes.shape) not in ((h,), (nb, h)):
            raise ValueError(
                f"alibi_slopes must have shape (heads,) = ({h},) or (batch, heads) = ({nb}, {h}), "
                f"got {tuple(alibi_slopes.shape)}")
        if not alibi_slopes.is_floating_point():
            raise TypeError(f"alibi_slopes must be float, got {alibi_slopes.dtype}")
    extra = None
    if mask is not None:
        if isinstance(mask, Mask):
            extra = mask
        elif isinstance(mask, torch.Tensor):
            extra = DenseMask(mask, batch=b, heads=h, seqlen_q=sq, seqlen_k=sk)
        else:
            raise TypeError(f"mask must be a memattn mask object or a bool tensor, got {type(mask).__name__}")
    kpm = KeyPaddingMask(key_padding_mask) if key_padding_mask is not None else None
    return AttentionSpec(scale=scale, mask=combine(structural, extra, kpm), softcap=float(softcap),
                         alibi_slopes=alibi_slopes)


def default_block(spec: AttentionSpec, backend) -> int:
    """Tile edge when the caller gives none: a block-sparse layout's own block; for a sliding
    window a power of two near its width over the backend's divisor (so edge tiles waste little, and a
    fused backend keeps its launches few), else the backend's default. backend: a ``kernels.Backend``."""
    mask = spec.mask
    if mask is not None and mask.preferred_block:
        return mask.preferred_block
    if mask is not None and mask.max_keys_per_row is not None:
        divisor, low, high = backend.window_block
        return max(low, min(high, 1 << max(0, (mask.max_keys_per_row // divisor).bit_length() - 1)))
    return backend.default_block
