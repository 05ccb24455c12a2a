"""Paged decode through the native C kernel (``kernels/csrc/paged_decode.c``): float32, bfloat16 or float16
caches on the CPU, float32 arithmetic.

One pass over the visible KV bytes, read in place through the block table: no gather copy (the
gather schedule's extra pass) and no per-tile call overhead (the fused aten kernel costs a few
microseconds per (block, head), which dominates 16-token blocks in ``paged_pool``). Each sequence keeps
all its heads' accumulators in L1 while it walks its blocks, reading each block's keys (all kv heads, one
contiguous run) front to back once, so GQA reads every key once. Long contexts are split into runs of
blocks processed by different threads and merged by log-sum-exp (flash-decoding), so a batch of one still
uses every core. Half-precision caches are widened to float32 as they are read (half the bytes to stream).

Quantized pools (``QuantizedPages``: int8, fp8 e4m3, KIVI int4 / int2) are read in place too: codes widened
in registers, scales applied to whole dot products and softmax weights (the C file's header has the algebra),
KIVI's full-precision residual blocks read where the residual map names them. No full-width copy is made.

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
# The quantized formats it reads in place (kv_formats names -> the C kernel's dtype codes).
KV_FORMATS = {"int8": 3, "fp8_e4m3": 4, "int4": 5, "int2": 6}


def _pointers(key_cache, value_cache):
    """(dtype code, the ten pool pointers paged_decode_quant takes, tensors to keep alive) of a cache pair."""
    if isinstance(key_cache, torch.Tensor):
        kc, vc = key_cache.contiguous(), value_cache.contiguous()  # views of a pool are already contiguous
        return DTYPES[key_cache.dtype], (kc.data_ptr(), vc.data_ptr()) + (None,) * 7, (kc, vc)
    parts = [key_cache.codes, value_cache.codes, key_cache.scale, key_cache.zero, value_cache.scale,
             value_cache.zero, key_cache.residual, value_cache.residual, key_cache.residual_map]
    parts = [None if t is None else t.contiguous() for t in parts]
    return KV_FORMATS[key_cache.format.name], tuple(None if t is None else t.data_ptr() for t in parts), parts


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
    code, pools, _alive = _pointers(key_cache, value_cache)
    table = block_table.to(torch.int32).contiguous()
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else None
    out = torch.empty((b, h, d), dtype=torch.float32)
    lse = torch.empty((b, h), dtype=torch.float32)
    rc = native.library().paged_decode_quant(
        code, qc.data_ptr(), *pools, table.data_ptr(), table.shape[1],
        lens.data_ptr(), starts.data_ptr(), b, h, hkv, d, bs, scale, float(softcap),
        slopes.data_ptr() if slopes is not None else None, nsplit, per, out.data_ptr(), lse.data_ptr(), threads)
    if rc != 0:
        raise RuntimeError(f"native paged decode failed (code {rc}: {'sizes' if rc == 1 else 'out of memory'})")
    # the kernel's running max skips NaN scores, so a NaN query (through softcap's tanh) came back as 0: make
    # it NaN, as the reference does, for the sequences that see a key
    nan_q = torch.isnan(qc).any(-1) & (lens > starts).unsqueeze(1)
    if bool(nan_q.any()):
        out[nan_q], lse[nan_q] = float("nan"), float("nan")
    return out, alibi_lse_shift(lse, slopes, query_pos, ranges)


def bind(block_table, ranges, *, num_heads: int, cache_shape, cache_dtype, scale: float, softcap: float = 0.0):
    """``decode`` with everything but q and the caches fixed: the per-step half of the call (ranges split into
    the kernel's arrays, the split plan, the table as int32) done once for all the layers of an engine step.

    Returns run(q, key_cache, value_cache) -> out (B, H, D) float32 for caches of `cache_shape` and
    `cache_dtype` (what the step's first layer validated; each call checks only that they still match).
    No ALiBi, sinks or quantised caches: the caller uses ``decode`` for those."""
    require_plain("native", ranges, None, None)
    nblocks, bs, hkv, d = cache_shape
    b, h = block_table.shape[0], num_heads
    starts, lens = ranges[:, 0, 0].contiguous(), ranges[:, 0, 1].contiguous()
    max_blocks = int(((lens + bs - 1) // bs - starts // bs).max()) if b else 0
    threads = torch.get_num_threads()
    nsplit, per = _splits(b, max_blocks, bs, threads)
    table = block_table.to(torch.int32).contiguous()
    code, lib = DTYPES[cache_dtype], native.library()
    shape, softcap = tuple(cache_shape), float(softcap)
    fixed = (table.data_ptr(), table.shape[1], lens.data_ptr(), starts.data_ptr(), b, h, hkv, d, bs, scale, softcap,
             None, nsplit, per)

    def run(q, key_cache, value_cache):
        if key_cache.shape != shape or value_cache.shape != shape or key_cache.dtype != cache_dtype \
                or value_cache.dtype != cache_dtype or not (key_cache.is_contiguous() and value_cache.is_contiguous()):
            raise ValueError(f"the bound decode step was built for contiguous {cache_dtype} caches of shape {shape}, "
                             f"got {key_cache.dtype} {tuple(key_cache.shape)}")
        if q.shape[0] != b or q.shape[1] != h or q.shape[2] != d:
            raise ValueError(f"the bound decode step takes q ({b}, {h}, {d}), got {tuple(q.shape)}")
        qc = q.to(torch.float32).contiguous()
        out = torch.empty((b, h, d), dtype=torch.float32)
        lse = torch.empty((b, h), dtype=torch.float32)
        rc = lib.paged_decode(code, qc.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), *fixed,
                              out.data_ptr(), lse.data_ptr(), threads)
        if rc != 0:
            raise RuntimeError(f"native paged decode failed (code {rc}: {'sizes' if rc == 1 else 'out of memory'})")
        return out

    run.keep_alive = (table, starts, lens)  # the arrays the kernel reads through raw pointers
    return run


__all__ = ["decode", "bind", "MIN_SPLIT_TOKENS"]
