"""``memattn.attention``: validate once, build the spec, run the chosen method."""
from __future__ import annotations

import torch

from .. import kernels
from .._validate import (check_dense_qkv, check_key_padding_mask, check_positive_int, check_window,
                         resolve_scale)
from ..masks import DenseMask, KeyPaddingMask, Mask, WindowMask, combine
from .blockwise import blockwise_attention
from .spec import AttentionSpec
from .standard import checkpointed_attention, standard_attention

METHODS = ("auto", "standard", "checkpoint", "blockwise")

# Tile edges. The fused CPU and Triton kernels tile internally, so their blocks only bound our
# merge temporaries and set the mask granularity; the torch tile materialises a block_q x block_k
# score tile per head, so it stays small.
DEFAULT_BLOCK = {"cpu_flash": 1024, "torch": 256, "triton": 1024}
FUSED_TILES = ("cpu_flash", "triton")
AUTO_BLOCK_Q = 4096


def build_spec(q, k, *, causal, softmax_scale, key_padding_mask, window_size=(-1, -1), alibi_slopes=None,
               softcap=0.0, mask=None, num_sequences=None) -> AttentionSpec:
    """Validate the masking arguments and fold them into one AttentionSpec.
    num_sequences: the batch that (batch, heads) ALiBi slopes index (packed input: the sequence count)."""
    b, sq, h, d = q.shape
    nb = b if num_sequences is None else num_sequences
    sk = k.shape[1]
    scale = resolve_scale(softmax_scale, d)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_key_padding_mask(key_padding_mask, b, sk, q.device)
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


def default_block(spec: AttentionSpec, tiles) -> int:
    """Tile edge when the caller gives none: a block-sparse layout's own block; for a sliding
    window about 1/8 of its width (so edge tiles waste little), else the implementation's default."""
    mask = spec.mask
    if mask is not None and mask.preferred_block:
        return mask.preferred_block
    if mask is not None and mask.max_keys_per_row is not None:
        if kernels.name_of(tiles) == "triton":  # fewer, larger launches: about half the window
            return max(128, min(1024, 1 << max(0, (mask.max_keys_per_row // 2).bit_length() - 1)))
        return max(32, min(256, 1 << max(0, (mask.max_keys_per_row // 8).bit_length() - 1)))
    return DEFAULT_BLOCK[kernels.name_of(tiles)]


def _sdpa_applies(q, k, spec: AttentionSpec) -> bool:
    """CUDA, half precision, plain dense or causal with Sq == Sk, nothing else: PyTorch's SDPA
    (FlashAttention backend) is the fastest exact kernel there, and it agrees with us exactly
    (its top-left causal equals our bottom-right one when Sq == Sk)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or spec.softcap or spec.alibi_slopes is not None:
        return False
    m = spec.mask
    causal = isinstance(m, WindowMask) and m.left < 0 and m.right == 0
    return m is None or (causal and q.shape[1] == k.shape[1])


def _sdpa_cuda(q, k, v, spec: AttentionSpec):
    """The one call into SDPA: (B, S, H, D) in and out, transposed only at this boundary."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=spec.mask is not None,
        scale=spec.scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def run_method(q, k, v, spec: AttentionSpec, method: str, block_size: int | None, return_lse: bool = True):
    """Dispatch to one method; returns (out, lse). Only the materialising methods skip lse when not asked."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    check_positive_int("block_size", block_size)
    if method == "standard":
        return standard_attention(q, k, v, spec, return_lse)
    if method == "checkpoint":
        return checkpointed_attention(q, k, v, spec, return_lse)
    tiles = kernels.select(q, softcap=spec.softcap)
    default = default_block(spec, tiles)
    block_k = block_size or default
    dense_or_causal = spec.mask is None or (isinstance(spec.mask, WindowMask) and spec.mask.left < 0)
    if method == "auto" and not return_lse and _sdpa_applies(q, k, spec):
        return _sdpa_cuda(q, k, v, spec), None
    if method == "auto" and block_size is None and kernels.name_of(tiles) in FUSED_TILES and dense_or_causal:
        # One query block up to AUTO_BLOCK_Q rows: the fused kernel then runs its own loop.
        block = min(max(q.shape[1], k.shape[1]), AUTO_BLOCK_Q)
        return blockwise_attention(q, k, v, spec, block, block)
    return blockwise_attention(q, k, v, spec, block_size or default, block_k)


def attention(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, window_size=(-1, -1),
              alibi_slopes=None, softcap=0.0, mask=None, method="auto", block_size=None, return_lse=False):
    """Exact softmax attention with a choice of memory strategy.

    Args:
        q: (batch, seqlen_q, heads, head_dim). k, v: (batch, seqlen_k, kv_heads, head_dim) with
            heads % kv_heads == 0 (MQA/GQA: query head h reads kv head h // (heads // kv_heads)).
        causal: query i sees key j iff j <= i + Sk - Sq (aligned bottom-right, as FlashAttention >= 2.1).
            Sq=2, Sk=5 (1 = visible)::

                1 1 1 1 0
                1 1 1 1 1

        softmax_scale: default 1 / sqrt(head_dim).
        key_padding_mask: bool (batch, seqlen_k), True = attend.
        window_size: (left, right); key j is visible to query i iff
            i + Sk - Sq - left <= j <= i + Sk - Sq + right; -1 = unbounded.
        alibi_slopes: float32 (heads,) or (batch, heads): bias -slope * |i + Sk - Sq - j|.
        softcap: scores -> softcap * tanh(scores / softcap); 0 = off.
        mask: a ``memattn.masks`` object or a bool tensor broadcastable to (batch, heads, Sq, Sk).
        method: "standard" (materialised scores), "checkpoint" (standard, recomputed in backward),
            "blockwise" (tiled online softmax, O(S) memory), "auto" (fastest exact path).
        block_size: tile edge for "blockwise" (default 1024 with the fused CPU tile, 256 otherwise).
        return_lse: also return lse (batch, heads, seqlen_q), float32 (float64 for float64 input),
            differentiable.
    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype, or (out, lse). Rows with no visible key
        give out 0 and lse -inf.
    """
    check_dense_qkv(q, k, v)
    spec = build_spec(q, k, causal=causal, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask,
                      window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap, mask=mask)
    out, lse = run_method(q, k, v, spec, method, block_size, return_lse)
    return (out, lse) if return_lse else out
