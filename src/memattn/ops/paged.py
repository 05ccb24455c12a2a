"""Paged attention: the blockwise schedule with key tiles read through a block table.

The cache is a pool of physical blocks ``(num_blocks, block_size, kv_heads, head_dim)``; sequence b's
logical token j lives in block ``block_table[b, j // block_size]`` at offset ``j % block_size``.
Nothing here is a new attention kernel: keys are gathered block by block into a bounded scratch
buffer and handed to the tile primitive (``memattn.kernels``); partial results are merged by
their log-sum-exp (``merge_attention``).

Two schedules:

- decode (every sequence has one query) on the CPU: the native C kernel (``paged_native``: float32,
  bfloat16, float16 caches read in place through the table), or where it cannot be built, without
  ALiBi/softcap: zero-copy, one fused-kernel call
  over the block pool itself and a per-sequence log-sum-exp merge (``paged_decode``, see there).
- decode otherwise (the gather schedule): all sequences advance together, ``C`` blocks per step.
  One ``index_select`` per step copies B x C blocks of keys (and of values) into a preallocated
  scratch buffer; one tile call attends all sequences to them; a mask appears only on steps where
  some sequence's context starts or ends. GQA query heads sharing a kv head are folded into the
  tile's query rows, so each key is read once per kv head.
- prefill / chunked prefill (packed queries): per sequence, the blockwise ``plan`` over
  (Lq new queries) x (L context keys), each key segment gathered from its blocks when needed.

Scratch is bounded by ``DECODE_SCRATCH_BYTES`` per decode step (keys and values each) and by
``PREFILL_BLOCK_K`` tokens per prefill segment, never the whole context.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import kernels, reference
from .._validate import FLOAT_DTYPES
from .merge import merge_attention
from .schedule import Problem, forward
from .spec import AttentionSpec, build_spec

# Key (and value) scratch per decode step, and the key segment of the prefill schedule.
DECODE_SCRATCH_BYTES = 8 << 20
PREFILL_BLOCK_Q = 1024
PREFILL_BLOCK_K = 1024


@dataclasses.dataclass(frozen=True)
class _Batch:
    """A validated call: per-sequence query offsets/lengths and context lengths (Python ints)."""

    q: torch.Tensor  # (total_q, H, D), packed view of the queries
    q_starts: list
    q_lens: list
    ctx_lens: list
    spec: AttentionSpec
    packed: bool
    shape: tuple  # q's original shape


def _check_int32(name, t, dim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dim(s), got shape {tuple(t.shape)}")


def _prepare(q, key_cache, value_cache, block_table, cache_seqlens, cu_seqlens_q, softmax_scale, causal,
             window_size, alibi_slopes, softcap) -> _Batch:
    """Validate every argument (sizes named in the errors) and build the spec."""
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q dtype must be one of float16/bfloat16/float32/float64, got {q.dtype}")
    want = 3 if cu_seqlens_q is not None else 4
    if q.dim() != want:
        layout = "(total_q, heads, head_dim) with cu_seqlens_q" if want == 3 else "(batch, seqlen_q, heads, head_dim)"
        raise ValueError(f"q must be {layout}, got shape {tuple(q.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError("key_cache and value_cache must both be (num_blocks, block_size, kv_heads, head_dim), "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise TypeError(f"q, key_cache, value_cache must share a dtype, got {q.dtype}, {key_cache.dtype}, "
                        f"{value_cache.dtype}")
    if key_cache.device != q.device or value_cache.device != q.device:
        raise ValueError(f"q and the caches must be on one device, got {q.device}, {key_cache.device}")
    num_blocks, bs, hkv, d = key_cache.shape
    h = q.shape[-2]
    if q.shape[-1] != d:
        raise ValueError(f"q head_dim {q.shape[-1]} != cache head_dim {d}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of cache kv heads ({hkv})")
    _check_int32("block_table", block_table, 2)
    _check_int32("cache_seqlens", cache_seqlens, 1)
    for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens), ("cu_seqlens_q", cu_seqlens_q)):
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    batch = block_table.shape[0]
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens has {cache_seqlens.shape[0]} entries but block_table has {batch} rows")
    if cu_seqlens_q is None:
        if q.shape[0] != batch:
            raise ValueError(f"q batch {q.shape[0]} != block_table rows {batch}")
        q_lens = [q.shape[1]] * batch
        qp = q.reshape(batch * q.shape[1], h, d)
    else:
        _check_int32("cu_seqlens_q", cu_seqlens_q, 1)
        if cu_seqlens_q.shape[0] != batch + 1:
            raise ValueError(f"cu_seqlens_q must have batch + 1 = {batch + 1} entries, got {cu_seqlens_q.shape[0]}")
        cu = cu_seqlens_q.tolist()
        if cu[0] != 0 or cu[-1] != q.shape[0] or any(a > b for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens_q must rise from 0 to total_q = {q.shape[0]}, got {cu}")
        q_lens = [b - a for a, b in zip(cu, cu[1:])]
        qp = q
    ctx = cache_seqlens.tolist()
    max_tokens = block_table.shape[1] * bs
    for b, (lq, lk) in enumerate(zip(q_lens, ctx)):
        if lk > max_tokens:
            raise ValueError(f"cache_seqlens[{b}] = {lk} exceeds what block_table covers "
                             f"({block_table.shape[1]} blocks x {bs} = {max_tokens} tokens)")
        if lk < lq:
            raise ValueError(f"cache_seqlens[{b}] = {lk} is shorter than its {lq} queries: cache_seqlens counts "
                             "the new tokens, which must already be written into the cache")
    used = torch.arange(block_table.shape[1]).unsqueeze(0) < ((cache_seqlens.long().cpu() + bs - 1) // bs).unsqueeze(1)
    ids = block_table.cpu()[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        bad = ids[(ids < 0) | (ids >= num_blocks)][0]
        raise ValueError(f"block_table holds block id {int(bad)} out of range [0, {num_blocks})")
    spec = build_spec((batch, 1, h, d), 1, causal=causal, softmax_scale=softmax_scale, key_padding_mask=None,
                      window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap)
    starts = [0]
    for lq in q_lens[:-1]:
        starts.append(starts[-1] + lq)
    return _Batch(qp, starts, q_lens, ctx, spec, cu_seqlens_q is not None, tuple(q.shape))


def _row_spec(spec: AttentionSpec, rows) -> AttentionSpec:
    """The spec restricted to batch rows `rows` (only per-sequence ALiBi slopes depend on the row)."""
    s = spec.alibi_slopes
    if s is None or s.dim() == 1:
        return spec
    return dataclasses.replace(spec, alibi_slopes=s[rows])


def _finish(batch: _Batch, out, lse, return_lse):
    """Packed (total_q, H, D) / (H, total_q) results -> the caller's layout."""
    h = out.shape[1]
    if not batch.packed:
        b, sq = batch.shape[0], batch.shape[1]
        out = out.view(b, sq, h, -1)
        lse = lse.view(h, b, sq).permute(1, 0, 2)
    return (out, lse) if return_lse else out


class _GatherKeys:
    """The key source of one sequence's prefill: keys [k0, k1) gathered through its block-table row,
    whole blocks gathered then sliced (one copy of at most PREFILL_BLOCK_K tokens plus a block)."""

    def __init__(self, key_cache, value_cache, table_row):
        self.caches, self.table_row = (key_cache, value_cache), table_row

    def __call__(self, k0: int, k1: int):
        bs = self.caches[0].shape[1]
        b0, b1 = k0 // bs, (k1 - 1) // bs + 1
        ids = self.table_row[b0:b1]
        return tuple(c.index_select(0, ids).flatten(0, 1)[k0 - b0 * bs:k1 - b0 * bs].unsqueeze(0) for c in self.caches)


def _prefill_sequence(q, key_cache, value_cache, table_row, ctx_len, spec, tiles):
    """One sequence: q (1, Lq, H, D) against its ctx_len cached keys; returns out (1, Lq, H, D) in q's dtype,
    lse (1, H, Lq) in the compute dtype. The blockwise forward loop over keys gathered through the table."""
    return forward(q, _GatherKeys(key_cache, value_cache, table_row), spec, [Problem(0, q.shape[1], 0, ctx_len)],
                   PREFILL_BLOCK_Q, PREFILL_BLOCK_K, tiles, max_run=PREFILL_BLOCK_K)


def _merge_all(outs, lses):
    """Merge partial results over disjoint keys as a balanced tree: log2(n) batched merge calls."""
    o, l = torch.stack(outs), torch.stack(lses)
    while o.shape[0] > 1:
        half = o.shape[0] // 2
        mo, ml = merge_attention(o[:half], l[:half], o[half:2 * half], l[half:2 * half])
        o, l = torch.cat([mo, o[2 * half:]]), torch.cat([ml, l[2 * half:]])
    return o[0], l[0]


def _decode(q, key_cache, value_cache, block_table, ctx_lens, spec, backend):
    """One query per sequence: q (B, 1, H, D); returns out (B, 1, H, D), lse (B, H, 1) in the compute dtype.

    The decode kernel the records choose (``kernels.choose_decode``: the native C kernel, the tile
    backend's own), else ``_decode_gather`` over the tile backend."""
    kernel = kernels.choose_decode(q, key_cache.dtype, backend, alibi=spec.alibi_slopes is not None,
                                   softcap=spec.softcap)
    if kernel is not None:
        return kernel.load()(q, key_cache, value_cache, block_table, ctx_lens, spec)
    return _decode_gather(q, key_cache, value_cache, block_table, ctx_lens, spec, backend.tiles)


def _decode_gather(q, key_cache, value_cache, block_table, ctx_lens, spec, tiles):
    """The gather schedule: out (B, 1, H, D), lse (B, H, 1) in the compute dtype (any tile, ALiBi, softcap).

    Sequence b's visible keys are [start_b, L_b) (start_b > 0 only with a left window). Step s attends
    every sequence to its logical blocks first_b + s*C ... + C-1, gathered into one scratch buffer.
    """
    nb_total, bs, hkv, d = key_cache.shape
    b, _, h, _ = q.shape
    g = h // hkv
    dev = q.device
    lens = torch.tensor(ctx_lens, dtype=torch.int64, device=dev)
    left = spec.mask.left if spec.mask is not None else -1
    start = (lens - 1 - left).clamp(min=0) if left >= 0 else torch.zeros_like(lens)
    first, end = start // bs, (lens + bs - 1) // bs  # logical blocks [first, end)
    steps_blocks = int((end - first).max())
    block_bytes = bs * hkv * d * key_cache.element_size()
    c = max(1, min(steps_blocks, DECODE_SCRATCH_BYTES // (b * block_bytes)))
    k_scr = torch.empty((b * c, bs, hkv, d), dtype=key_cache.dtype, device=dev)
    v_scr = torch.empty_like(k_scr)
    # GQA: the g query heads of a kv head become g query rows of that head: (B, g, Hkv, D).
    qx = q.view(b, hkv, g, d).transpose(1, 2)
    # Every step's block ids and whether it needs a mask, computed once (small (B, steps*C) tensors).
    n_steps = -(-steps_blocks // c)
    cols = first.unsqueeze(1) + torch.arange(n_steps * c, device=dev)  # (B, steps*C) logical blocks
    live = cols < end.unsqueeze(1)
    ids = torch.where(live, block_table.gather(1, cols.clamp(max=block_table.shape[1] - 1)), 0)
    ids = ids.view(b, n_steps, c).transpose(0, 1).contiguous()  # (steps, B, C)
    inside = (cols * bs >= start.unsqueeze(1)) & ((cols + 1) * bs <= lens.unsqueeze(1))  # block wholly visible
    needs_mask = (~inside).view(b, n_steps, c).any(2).any(0).tolist()
    tok = torch.arange(bs, device=dev)
    slopes = spec.alibi_slopes
    if slopes is not None:
        slopes = slopes.to(device=dev, dtype=torch.float32).view(-1, hkv, g, 1)
    outs, lses = [], []
    for s in range(n_steps):
        torch.index_select(key_cache, 0, ids[s].view(-1), out=k_scr)
        torch.index_select(value_cache, 0, ids[s].view(-1), out=v_scr)
        mask = bias = None
        if needs_mask[s] or slopes is not None:
            pos = (cols[:, s * c:(s + 1) * c].unsqueeze(2) * bs + tok).view(b, c * bs)  # logical token positions
            if needs_mask[s]:
                mask = ((pos >= start.unsqueeze(1)) & (pos < lens.unsqueeze(1))).view(b, 1, 1, c * bs)
            if slopes is not None:  # -slope * (L - 1 - j), per (B|1, Hkv, g) -> rows of (B, Hkv, g, T)
                bias = -slopes * (lens.unsqueeze(1) - 1 - pos).to(torch.float32).view(b, 1, 1, c * bs)
        o, l = tiles.tile_forward(qx, k_scr.view(b, c * bs, hkv, d), v_scr.view(b, c * bs, hkv, d),
                                  scale=spec.scale, mask=mask, bias=bias, softcap=spec.softcap)
        outs.append(o)
        lses.append(l)
    acc = _merge_all(outs, lses)
    o, l = acc  # o (B, g, Hkv, D), l (B, Hkv, g)
    return o.transpose(1, 2).reshape(b, 1, h, d), l.reshape(b, h, 1)


def paged_attention(q, key_cache, value_cache, block_table, cache_seqlens, *, cu_seqlens_q=None,
                    softmax_scale=None, causal=True, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                    return_lse=False):
    """Attention of new queries to a paged KV cache (decode, prefill and chunked prefill). Inference only.

    Args:
        q: (batch, seqlen_q, heads, head_dim), or packed (total_q, heads, head_dim) with ``cu_seqlens_q``.
            Decode is seqlen_q = 1.
        key_cache, value_cache: (num_blocks, block_size, kv_heads, head_dim), q's dtype and device;
            heads % kv_heads == 0 (query head h reads kv head h // (heads // kv_heads)).
        block_table: int32 (batch, max_blocks): sequence b's logical block i is physical block
            ``block_table[b, i]``. Entries past a sequence's context are never read.
        cache_seqlens: int32 (batch,): tokens of each sequence in the cache, **including the new
            tokens whose queries are in q** (write them first, e.g. ``PagedKVCache.write``); this is
            vLLM's and FlashAttention's convention. So a sequence with Lq queries and cache_seqlens L
            has its queries at positions L - Lq ... L - 1.
        cu_seqlens_q: int32 (batch + 1,): packed query offsets (chunked prefill; lengths may be 0).
        causal: query i sees key j iff j <= i + L - Lq (bottom-right aligned). Lq=2, L=5::

                1 1 1 1 0
                1 1 1 1 1

        window_size: (left, right), -1 = unbounded: key j visible to query i iff
            i + L - Lq - left <= j <= i + L - Lq + right.
        alibi_slopes: float (heads,) or (batch, heads): bias -slope * |i + L - Lq - j|.
        softmax_scale: default 1 / sqrt(head_dim). softcap: 0 = off.
        return_lse: also return lse, float32 (float64 for float64 input): (batch, heads, seqlen_q),
            or (heads, total_q) for packed q.
    Returns:
        out shaped like q, in q's dtype (rows with no visible key: 0, lse -inf), or (out, lse).

    Scratch memory is bounded: a decode step gathers ``DECODE_SCRATCH_BYTES`` of keys (and of values)
    for all sequences; prefill gathers at most ``PREFILL_BLOCK_K`` tokens (plus one block) at a time.
    """
    batch = _prepare(q, key_cache, value_cache, block_table, cache_seqlens, cu_seqlens_q, softmax_scale,
                     causal, window_size, alibi_slopes, softcap)
    spec, qp = batch.spec, batch.q
    backend = kernels.choose(qp, softcap=spec.softcap)
    cd = kernels.compute_dtype(qp.dtype)
    h = qp.shape[1]
    decode = [b for b, lq in enumerate(batch.q_lens) if lq == 1]
    if decode and len(decode) == len(batch.q_lens):  # a pure decode step: no scatter into the packed rows
        with torch.no_grad():
            o, l = _decode(qp.unsqueeze(1), key_cache, value_cache, block_table, batch.ctx_lens, spec, backend)
        return _finish(batch, o.squeeze(1).to(q.dtype), l.squeeze(2).transpose(0, 1), return_lse)
    out = torch.zeros(qp.shape, dtype=cd, device=qp.device)
    lse = torch.full((h, qp.shape[0]), float("-inf"), dtype=cd, device=qp.device)
    with torch.no_grad():
        if decode:
            rows = torch.tensor(decode, device=qp.device)
            where = torch.tensor([batch.q_starts[b] for b in decode], device=qp.device)
            o, l = _decode(qp.index_select(0, where).unsqueeze(1), key_cache, value_cache,
                           block_table.index_select(0, rows.to(block_table.device)),
                           [batch.ctx_lens[b] for b in decode], _row_spec(spec, rows), backend)
            out[where], lse[:, where] = o.squeeze(1), l.squeeze(2).transpose(0, 1)
        for b, (q0, lq) in enumerate(zip(batch.q_starts, batch.q_lens)):
            if lq < 2:
                continue
            o, l = _prefill_sequence(qp[q0:q0 + lq].unsqueeze(0), key_cache, value_cache, block_table[b],
                                     batch.ctx_lens[b], _row_spec(spec, b), backend.tiles)
            out[q0:q0 + lq], lse[:, q0:q0 + lq] = o[0], l[0]
    return _finish(batch, out.to(q.dtype), lse, return_lse)


def paged_attention_reference(q, key_cache, value_cache, block_table, cache_seqlens, *, cu_seqlens_q=None,
                              softmax_scale=None, causal=True, window_size=(-1, -1), alibi_slopes=None,
                              softcap=0.0, return_lse=False):
    """``paged_attention`` the slow, obvious way: gather every key token by token through the block
    table into a contiguous tensor, build the dense mask and bias, run ``memattn.reference`` in q's
    dtype. The oracle of the paged tests (run it in float64)."""
    batch = _prepare(q, key_cache, value_cache, block_table, cache_seqlens, cu_seqlens_q, softmax_scale,
                     causal, window_size, alibi_slopes, softcap)
    spec, qp = batch.spec, batch.q
    bs, hkv, d = key_cache.shape[1:]
    h = qp.shape[1]
    out = torch.zeros(qp.shape, dtype=qp.dtype, device=qp.device)
    lse = torch.full((h, qp.shape[0]), float("-inf"), dtype=qp.dtype, device=qp.device)
    flat_k, flat_v = key_cache.reshape(-1, hkv, d), value_cache.reshape(-1, hkv, d)
    for b, (q0, lq, lk) in enumerate(zip(batch.q_starts, batch.q_lens, batch.ctx_lens)):
        if lq == 0:
            continue
        slots = [int(block_table[b, j // bs]) * bs + j % bs for j in range(lk)]
        k = flat_k[slots].unsqueeze(0)
        v = flat_v[slots].unsqueeze(0)
        sb = _row_spec(spec, b)
        mask = None if sb.mask is None else sb.mask.dense(lq, lk, qp.device)
        o, l = reference.attention(qp[q0:q0 + lq].unsqueeze(0), k, v, mask=mask, bias=sb.dense_bias(lq, lk, qp.device),
                                   softmax_scale=spec.scale, softcap=spec.softcap, return_lse=True)
        out[q0:q0 + lq], lse[:, q0:q0 + lq] = o[0], l[0]
    return _finish(batch, out, lse, return_lse)


__all__ = ["paged_attention", "paged_attention_reference"]
