"""Variable-length (packed) attention: each sequence is its own problem in one blockwise schedule.

No padding is computed: tiles only ever pair queries and keys of the same sequence.
"""
from __future__ import annotations

from .. import kernels
from .._validate import check_int32, check_packed_qkv, check_sinks
from .blockwise import blockwise_attention
from .merge import merge_sinks
from .schedule import Problem
from .spec import build_spec, default_block


def _check_cu_seqlens(name, cu, total, batch=None):
    check_int32(name, cu, 1)
    if cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu.shape)}")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"{name} has {cu.numel() - 1} sequences but cu_seqlens_q has {batch}")
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {vals[-1]}")
    return vals


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     softmax_scale=None, window_size=(-1, -1), alibi_slopes=None, softcap=0.0, return_lse=False, sinks=None):
    """Attention over packed variable-length sequences.

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D), H % Hkv == 0. Sequence i owns rows
            cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1] of k/v.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), starting at 0, non-decreasing, ending at the totals.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (checked: must be >= the actual maxima).
        causal, window_size, alibi_slopes ((H,) or (batch, H)), softcap, softmax_scale: as in
            ``memattn.attention``, applied within each sequence (bottom-right aligned per sequence).
        sinks: (H,) learnable sink logits, as in ``memattn.attention``.
    Returns:
        out (total_q, H, D), and with return_lse, lse (H, total_q) float32.
    """
    check_packed_qkv(q, k, v)
    check_sinks(sinks, q.shape[1], q.dtype, q.device)
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], batch=len(cq) - 1)
    lens_q = [b - a for a, b in zip(cq, cq[1:])]
    lens_k = [b - a for a, b in zip(ck, ck[1:])]
    for name, given, actual in (("max_seqlen_q", max_seqlen_q, max(lens_q)), ("max_seqlen_k", max_seqlen_k, max(lens_k))):
        if isinstance(given, bool) or not isinstance(given, int) or given < actual:
            raise ValueError(f"{name} must be an int >= the longest sequence ({actual}), got {given!r}")
    batch = len(lens_q)
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # one packed batch row
    spec = build_spec(q4.shape, k4.shape[1], causal=causal, softmax_scale=softmax_scale, key_padding_mask=None,
                      window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap, num_sequences=batch)
    problems = [Problem(cq[i], lens_q[i], ck[i], lens_k[i], index=i) for i in range(batch)
                if lens_q[i] > 0 and lens_k[i] > 0]
    backend = kernels.choose(q4, softcap=spec.softcap)
    block = default_block(spec, backend)
    out, lse = blockwise_attention(q4, k4, v4, spec, block, block, impl=backend, problems=problems)
    out, lse = out.squeeze(0), lse.squeeze(0)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out
