"""What every model shares: the per-step batch metadata, the paged attention call, rotary embeddings."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...cache import PagedKVCache
from ...ops.paged import paged_attention


@dataclass
class StepBatch:
    """One engine step, packed: the new tokens of every scheduled sequence back to back.

    input_ids, positions, slot_mapping: (T,) int64 (slot = block * block_size + offset, where the
    token's K/V is written). block_table: int32 (B, max_blocks). cache_seqlens: int32 (B,), context
    length of each sequence *including* its new tokens. cu_seqlens_q: int32 (B + 1,). logits_indices:
    (R,) rows of the packed tokens whose next-token logits are wanted.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    logits_indices: torch.Tensor


def paged_self_attention(q, k, v, batch: StepBatch, cache: PagedKVCache, layer: int, *, scale: float,
                         window: int | None = None):
    """Write the new k, v (T, Hkv, D) into the pool, then attend q (T, H, D) to each sequence's context.

    window W (transformers' ``sliding_window``): key j is visible to query i iff i - W < j <= i.
    """
    cache.write(batch.slot_mapping, k, v, layer=layer)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    return paged_attention(q, cache.key_cache(layer), cache.value_cache(layer), batch.block_table,
                           batch.cache_seqlens, cu_seqlens_q=batch.cu_seqlens_q, softmax_scale=scale,
                           causal=True, window_size=window_size)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) float32, with "linear" or "llama3" scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype):
    """cos, sin (T, 1, head_dim) for the positions, halves repeated (the rotate-half convention)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


__all__ = ["StepBatch", "paged_self_attention", "rope_inv_freq", "rope_cos_sin", "apply_rope"]
