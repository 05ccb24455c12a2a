"""``memattn.attention``: validate once, build the spec, run the chosen method."""
from __future__ import annotations

import torch

from .. import kernels
from .._validate import check_dense_qkv, check_positive_int, check_sinks
from ..masks import WindowMask
from .blockwise import blockwise_attention
from .merge import merge_sinks
from .spec import AttentionSpec, build_spec, default_block
from .standard import checkpointed_attention, standard_attention

METHODS = ("auto", "standard", "checkpoint", "blockwise")

# Query block of "auto" on a fused backend for dense or causal calls: one block up to this many
# rows, so the fused kernel runs its own loop (our blocks only bound merge temporaries).
AUTO_BLOCK_Q = 4096


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
    backend = kernels.choose(q, softcap=spec.softcap)
    default = default_block(spec, backend)
    block_k = block_size or default
    dense_or_causal = spec.mask is None or (isinstance(spec.mask, WindowMask) and spec.mask.left < 0)
    if method == "auto" and not return_lse and _sdpa_applies(q, k, spec):
        return _sdpa_cuda(q, k, v, spec), None
    if method == "auto" and block_size is None and backend.fused and dense_or_causal:
        # One query block up to AUTO_BLOCK_Q rows: the fused kernel then runs its own loop.
        block = min(max(q.shape[1], k.shape[1], 1), AUTO_BLOCK_Q)  # >= 1: empty inputs plan no tile
        return blockwise_attention(q, k, v, spec, block, block, impl=backend)
    return blockwise_attention(q, k, v, spec, block_size or default, block_k, impl=backend)


def attention(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, window_size=(-1, -1),
              alibi_slopes=None, softcap=0.0, mask=None, method="auto", block_size=None, return_lse=False,
              sinks=None):
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
        block_size: tile edge for "blockwise" and "auto" (default: the tile backend's, ``kernels.Backend.default_block``:
            1024 for the fused CPU and Triton tiles, 256 for the torch tile; under a sliding window a fraction of
            its width; a block-sparse layout's own block). "auto" on a fused backend runs dense and causal calls
            in query blocks of up to 4096 rows.
        return_lse: also return lse (batch, heads, seqlen_q), float32 (float64 for float64 input),
            differentiable.
        sinks: learnable attention sinks (gpt-oss): (heads,) float32 or q's dtype, one logit per query head
            that joins the softmax denominator and holds no value (p_j = exp(s_j) / (exp(sink) + sum exp(s));
            lse includes it). Differentiable; every method (``ops.merge.merge_sinks`` on its (out, lse)).
    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype, or (out, lse). Rows with no visible key
        give out 0 and lse -inf.
    """
    check_dense_qkv(q, k, v)
    spec = build_spec(q.shape, k.shape[1], device=q.device, causal=causal, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask,
                      window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap, mask=mask)
    check_sinks(sinks, q.shape[2], q.dtype, q.device)
    out, lse = run_method(q, k, v, spec, method, block_size, return_lse or sinks is not None)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out
