"""Paged decode through the native C kernel (``kernels/csrc/paged_decode.c``): float32, bfloat16 or float16
caches on the CPU, float32 arithmetic.

One pass over the visible KV bytes, read in place through the block table: no gather copy (the
gather schedule's extra pass) and no per-tile call overhead (the fused aten kernel costs a few
microseconds per (block, head), which dominates 16-token blocks in ``paged_pool``). Each sequence keeps
all its heads' accumulators in L1 while it walks its blocks, reading each block's keys (all kv heads, one
contiguous run) front to back once, so GQA reads every key once. Long contexts are split into runs of
blocks processed by different threads and merged by log-sum-exp (flash-decoding), so a batch of one still
uses every core. Half-precision caches are widened to float32 as they are read (half the bytes to stream).

Follows the ``paged_decode`` contract. Covers one visible range per sequence (causal/non-causal,
sliding windows), ALiBi and softcap. float64 and other devices use ``paged_pool`` / the gather schedule.
"""
from __future__ import annotations

import torch

from . import native
from .paged_decode import alibi_lse_shift, require_plain

# A split covers at least this many keys: smaller runs cost more in partial results than they gain.
MIN_SPLIT_TOKENS = 256
# Work items wanted per thread, so that uneven context lengths still balance.
ITEMS_PER_THREAD = 4


# The cache element types the kernel reads (its dtype code); arithmetic is float32 for all of them.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _splits(b: int, max_blocks: int, bs: int, threads: int) -> tuple[int, int]:
    """(number of splits, blocks per split) so that B * splits work items cover the threads a few times."""
    want = -(-ITEMS_PER_THREAD * threads // max(1, b)) if threads > 1 else 1
    most = max(1, max_blocks * bs // MIN_SPLIT_TOKENS)
    n = max(1, min(want, most))
    per = max(1, -(-max_blocks // n))
    return -(-max_blocks // per) if max_blocks else 1, per


def decode(q, key_cache, value_cache, block_table, ranges, *, scale, softcap=0.0, alibi_slopes=None,
           query_pos=None, sinks=None, kv_scales=None):
    """The ``paged_decode`` contract: q (B, H, D) -> out (B, H, D), lse (B, H), float32 (the compute
    dtype of all three cache dtypes)."""
    require_plain("native", ranges, sinks, kv_scales)
    nblocks, bs, hkv, d = key_cache.shape
    b, h, _ = q.shape
    # the C kernel takes each sequence's one range as two int64 arrays; its ALiBi puts the query at lens - 1
    starts, lens = ranges[:, 0, 0].contiguous(), ranges[:, 0, 1].contiguous()
    max_blocks = int(((lens + bs - 1) // bs - starts // bs).max()) if b else 0
    threads = torch.get_num_threads()
    nsplit, per = _splits(b, max_blocks, bs, threads)
    qc = q.to(torch.float32).contiguous()
    kc, vc = key_cache.contiguous(), value_cache.contiguous()  # views of a pool are already contiguous
    table = block_table.to(torch.int32).contiguous()
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else None
    out = torch.empty((b, h, d), dtype=torch.float32)
    lse = torch.empty((b, h), dtype=torch.float32)
    rc = native.library().paged_decode(
        DTYPES[key_cache.dtype], qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), table.data_ptr(), table.shape[1],
        lens.data_ptr(), starts.data_ptr(), b, h, hkv, d, bs, scale, float(softcap),
        slopes.data_ptr() if slopes is not None else None, nsplit, per, out.data_ptr(), lse.data_ptr(), threads)
    if rc != 0:
        raise RuntimeError(f"native paged decode failed (code {rc}: {'sizes' if rc == 1 else 'out of memory'})")
    return out, alibi_lse_shift(lse, slopes, query_pos, ranges)


__all__ = ["decode", "MIN_SPLIT_TOKENS"]
