"""The one contract every paged-decode kernel follows, and the visible-range helper its callers share.

A decode kernel attends one query per sequence to a paged KV cache read in place through its
block table. ``"native"`` (``paged_native``), ``"pool"`` (``paged_pool``) and ``"triton"``
(``triton/paged.py``) all take exactly::

    decode(q, key_cache, value_cache, block_table, ranges, *, scale, softcap=0.0,
           alibi_slopes=None, query_pos=None, sinks=None, kv_scales=None) -> (out, lse)

- q: (B, H, D), one query per sequence.
- key_cache, value_cache: (num_blocks, block_size, Hkv, D), H % Hkv == 0 (query head h reads kv
  head h // (H // Hkv)); sequence b's token j lives at ``block_table[b, j // block_size]``,
  offset ``j % block_size``. A kernel whose record lists quantized ``kv_formats`` also takes the
  ``memattn.cache.kv_formats.QuantizedPages`` of a quantized pool here (codes, scales, zero points
  and KIVI's residual blocks in one object, of that same shape) and reads it in place.
- block_table: int32 (B, max_blocks). Entries of blocks holding no visible token are never read.
- ranges: int64 (B, R, 2) on q's device, ``[start, end)`` token ranges each sequence attends to,
  disjoint and ascending (``visible_ranges`` builds them). R = 1 today (a sliding window, or the
  whole context); R = 2 will be StreamingLLM's first sink tokens plus a recent window.
- scale: softmax scale. softcap: scores -> softcap * tanh(scores / softcap); 0 = off.
- alibi_slopes: float32 (B, H) or None: score -= slope * (query_pos - j) (after softcap).
- query_pos: int64 (B,) or None: the query's position, default ``ranges[:, -1, 1] - 1`` (the
  last visible token is the query's own). Only ALiBi reads it.
- sinks: float32 (H,) or None (next issue): one learnable logit per head that joins the softmax
  denominator and holds no value (``lse`` includes it; ``out`` is scaled by 1 - its share).
- kv_scales: reserved, always None: a quantized cache's scales travel inside its ``QuantizedPages``.

Returns ``out`` (B, H, D) and ``lse`` (B, H), natural log, in the compute dtype of q
(``torch_tiles.compute_dtype``). A sequence without a visible key gets out 0 and lse -inf.

Which kernel reads what (KV formats, ALiBi, softcap, sinks, how many ranges) is declared in its
``DecodeKernel`` record, so ``kernels.choose_decode`` refuses a call before any kernel sees it;
``require_plain`` is each kernel's own guard for what none of them reads yet.
"""
from __future__ import annotations

import torch


def visible_ranges(ctx_lens: torch.Tensor, window_left: int = -1, sink_tokens: int = 0) -> torch.Tensor:
    """The keys each decode query sees: int64 (B, R, 2) ``[start, end)`` ranges, on ctx_lens' device.

    ctx_lens: int (B,) context lengths, the query's own token included (it is the last one).
    window_left: -1 = unbounded, else the query at position L - 1 sees keys L - 1 - window_left ... L - 1.
    sink_tokens: StreamingLLM's always-visible first tokens; only 0 today (R = 1).
    """
    if sink_tokens:
        raise NotImplementedError("sink tokens (two visible ranges) are not implemented yet")
    end = ctx_lens.to(torch.int64)
    start = (end - 1 - window_left).clamp_(min=0) if window_left >= 0 else torch.zeros_like(end)
    return torch.stack((start, end), 1).unsqueeze(1)


def alibi_lse_shift(lse, alibi_slopes, query_pos, ranges):
    """lse of a call whose kernel put the query at the default ``ranges[:, -1, 1] - 1``, moved to
    ``query_pos``: an ALiBi bias shifted by a constant per (sequence, head) leaves the softmax (out)
    unchanged and adds that constant to lse. lse, alibi_slopes (B, H); query_pos, None or (B,)."""
    if query_pos is None or alibi_slopes is None:
        return lse
    shift = (query_pos.to(torch.int64) - (ranges[:, -1, 1] - 1)).to(torch.float32)
    return lse - (alibi_slopes * shift.unsqueeze(1)).to(lse.dtype)


def require_plain(name: str, ranges, sinks, kv_scales) -> None:
    """Refuse what no kernel reads yet (the records refuse it first; this guards direct calls)."""
    if ranges.shape[1] != 1 or sinks is not None or kv_scales is not None:
        raise ValueError(f"the {name} decode kernel reads one visible range of a full-width cache without "
                         f"sink logits; got {ranges.shape[1]} ranges, sinks={sinks is not None}, "
                         f"kv_scales={kv_scales is not None}")


__all__ = ["visible_ranges", "alibi_lse_shift", "require_plain"]
