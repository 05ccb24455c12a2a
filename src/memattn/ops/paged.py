"""Paged attention: validation, and the choice between decode and prefill for each sequence.

The cache is a pool of physical blocks ``(num_blocks, block_size, kv_heads, head_dim)``; sequence b's
logical token j lives in block ``block_table[b, j // block_size]`` at offset ``j % block_size``.
Block table, context lengths and query offsets are validated once per call, or once per engine
step (``paged_metadata``, then ``paged_attention(..., metadata=...)`` in every layer).

- decode (sequences with one query): the decode kernel the records choose (``kernels.choose_decode``;
  the one contract they share is ``kernels/paged_decode.py``): the native C kernel, the zero-copy
  pool schedule or Triton, each reading the cache in place through the table, over visible key
  ranges built once (``kernels.paged_decode.visible_ranges``).
- decode where no kernel applies (the gather schedule, the same contract): all sequences advance
  together, ``C`` blocks per step. One ``index_select`` per step copies B x C blocks of keys (and of
  values) into a preallocated scratch buffer; one tile call attends all sequences to them; a mask
  appears only on steps where some sequence's context starts or ends. GQA query heads sharing a kv
  head are folded into the tile's query rows, so each key is read once per kv head. The steps'
  partial results are merged by their log-sum-exp (``kernels.merge``).
- prefill / chunked prefill (packed queries): per sequence, the blockwise ``plan`` over
  (Lq new queries) x (L context keys), each key segment gathered from its blocks when needed.

Scratch is bounded by ``DECODE_SCRATCH_BYTES`` per decode step (keys and values each) and by
``PREFILL_BLOCK_K`` tokens per prefill segment, never the whole context. The oracle is
``memattn.reference.paged_attention`` (also importable here as ``paged_attention_reference``).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..cache.kv_formats import QuantizedPages
from ..kernels.merge import merge_partials
from ..reference import paged_attention as paged_attention_reference
from .._validate import check_sinks
from .merge import merge_sinks
from .paged_metadata import PagedMetadata, paged_metadata, resolve
from .schedule import Problem, forward
from .spec import AttentionSpec, build_spec

# Key (and value) scratch per decode step, and the key segment of the prefill schedule.
DECODE_SCRATCH_BYTES = 8 << 20
PREFILL_BLOCK_Q = 1024
PREFILL_BLOCK_K = 1024


@dataclasses.dataclass(frozen=True)
class _Batch:
    """A validated call: the packed queries, the step's metadata, the spec."""

    q: torch.Tensor  # (total_q, H, D), packed view of the queries
    md: PagedMetadata
    spec: AttentionSpec
    shape: tuple  # q's original shape


def _prepare(q, key_cache, value_cache, block_table, cache_seqlens, cu_seqlens_q, softmax_scale, causal,
             window_size, alibi_slopes, softcap, metadata=None) -> _Batch:
    """Validate every argument (sizes named in the errors; with `metadata`, only what depends on q and
    the caches) and build the spec."""
    md = resolve(q, key_cache, value_cache, block_table, cache_seqlens, cu_seqlens_q, metadata)
    h, d = q.shape[-2:]
    spec = build_spec((md.block_table.shape[0], 1, h, d), 1, causal=causal, softmax_scale=softmax_scale,
                      key_padding_mask=None, window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap)
    return _Batch(q if md.packed else q.reshape(-1, h, d), md, spec, tuple(q.shape))


def _row_spec(spec: AttentionSpec, rows) -> AttentionSpec:
    """The spec restricted to batch rows `rows` (only per-sequence ALiBi slopes depend on the row)."""
    s = spec.alibi_slopes
    if s is None or s.dim() == 1:
        return spec
    return dataclasses.replace(spec, alibi_slopes=s[rows])


def _finish(batch: _Batch, out, lse, return_lse, sinks=None):
    """Packed (total_q, H, D) / (H, total_q) results in the compute dtype -> the caller's layout in q's dtype,
    sinks merged first (before the output is rounded to q's dtype)."""
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    out = out.to(batch.q.dtype)
    h = out.shape[1]
    if not batch.md.packed:
        b, sq = batch.shape[0], batch.shape[1]
        out = out.view(b, sq, h, out.shape[-1])  # not -1: empty when every sequence has 0 queries
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


def _decode_slopes(spec: AttentionSpec, md: PagedMetadata, h: int, device):
    """The decode rows' ALiBi slopes as the decode contract takes them: float32 (len(md.decode), H), or None."""
    s = spec.alibi_slopes
    if s is None:
        return None
    s = s.to(device=device, dtype=torch.float32)
    if s.dim() == 1:
        return s.expand(len(md.decode), h)
    return s if md.decode_q_rows is None else s.index_select(0, torch.tensor(md.decode, device=device))


def _decode_rows(qp, key_cache, value_cache, md: PagedMetadata, spec, backend):
    """The step's decode rows (``md.decode``): out (len(decode), H, D), lse (len(decode), H) in the compute dtype."""
    ranges = md.decode_ranges(spec.mask.left if spec.mask is not None else -1)
    q = qp if md.decode_q_rows is None else qp.index_select(0, md.decode_q_rows)
    return _decode(q, key_cache, value_cache, md.decode_table, ranges, spec,
                   _decode_slopes(spec, md, qp.shape[1], qp.device), backend)


def _decode(q, key_cache, value_cache, block_table, ranges, spec, slopes, backend):
    """One query per sequence: q (B, H, D), ranges (B, 1, 2); returns out (B, H, D), lse (B, H) in the
    compute dtype.

    The decode kernel the records choose (``kernels.choose_decode``: the native C kernel, the tile
    backend's own), else ``_decode_gather`` over the tile backend."""
    kernel = kernels.choose_decode(q, key_cache.dtype, backend, alibi=slopes is not None, softcap=spec.softcap,
                                   ranges=ranges.shape[1], kv_format=kv_format_of(key_cache))
    args = dict(scale=spec.scale, softcap=spec.softcap, alibi_slopes=slopes)
    if kernel is not None:
        return kernel.load()(q, key_cache, value_cache, block_table, ranges, **args)
    return _decode_gather(q, key_cache, value_cache, block_table, ranges, tiles=backend.tiles, **args)


def kv_format_of(cache) -> str:
    """The decode records' name for a cache's storage format: ``kernels.FULL_WIDTH`` for a tensor."""
    return cache.format.name if isinstance(cache, QuantizedPages) else kernels.FULL_WIDTH


def _select_blocks(cache, ids, out) -> None:
    """out (n, bs, Hkv, D) = blocks `ids` of a full-width cache (copied) or of quantized pages (dequantized)."""
    if isinstance(cache, torch.Tensor):
        torch.index_select(cache, 0, ids, out=out)
    else:
        out.copy_(cache.index_select(0, ids))


def _decode_gather(q, key_cache, value_cache, block_table, ranges, *, scale, softcap, alibi_slopes, tiles):
    """The gather schedule under the decode contract (``kernels.paged_decode``; one range, the query at
    its end - 1): out (B, H, D), lse (B, H) in the compute dtype (any tile, ALiBi, softcap).

    Sequence b's visible keys are [start_b, L_b). Step s attends every sequence to its logical blocks
    first_b + s*C ... + C-1, gathered into one scratch buffer.
    """
    nb_total, bs, hkv, d = key_cache.shape
    b, h, _ = q.shape
    g = h // hkv
    dev = q.device
    start, lens = ranges[:, 0, 0], ranges[:, 0, 1]
    first, end = start // bs, (lens + bs - 1) // bs  # logical blocks [first, end)
    steps_blocks = int((end - first).max())
    block_bytes = bs * hkv * d * torch.finfo(key_cache.dtype).bits // 8  # of the (dequantized) scratch
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
    slopes = None if alibi_slopes is None else alibi_slopes.reshape(b, hkv, g, 1)
    outs, lses = [], []
    for s in range(n_steps):
        _select_blocks(key_cache, ids[s].view(-1), k_scr)
        _select_blocks(value_cache, ids[s].view(-1), v_scr)
        mask = bias = None
        if needs_mask[s] or slopes is not None:
            pos = (cols[:, s * c:(s + 1) * c].unsqueeze(2) * bs + tok).view(b, c * bs)  # logical token positions
            if needs_mask[s]:
                mask = ((pos >= start.unsqueeze(1)) & (pos < lens.unsqueeze(1))).view(b, 1, 1, c * bs)
            if slopes is not None:  # -slope * (L - 1 - j), per (B, Hkv, g) -> rows of (B, Hkv, g, T)
                bias = -slopes * (lens.unsqueeze(1) - 1 - pos).to(torch.float32).view(b, 1, 1, c * bs)
        o, l = tiles.tile_forward(qx, k_scr.view(b, c * bs, hkv, d), v_scr.view(b, c * bs, hkv, d),
                                  scale=scale, mask=mask, bias=bias, softcap=softcap)
        outs.append(o)  # (B, g, Hkv, D)
        lses.append(l.transpose(1, 2))  # (B, Hkv, g) -> (B, g, Hkv), out's rows
    o, l = merge_partials(torch.stack(outs), torch.stack(lses), 0)  # (B, g, Hkv, D), (B, g, Hkv)
    return o.transpose(1, 2).reshape(b, h, d), l.transpose(1, 2).reshape(b, h)


def paged_attention(q, key_cache, value_cache, block_table, cache_seqlens, *, cu_seqlens_q=None,
                    softmax_scale=None, causal=True, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                    return_lse=False, metadata: PagedMetadata | None = None, sinks=None):
    """Attention of new queries to a paged KV cache (decode, prefill and chunked prefill). Inference only.

    Args:
        q: (batch, seqlen_q, heads, head_dim), or packed (total_q, heads, head_dim) with ``cu_seqlens_q``.
            Decode is seqlen_q = 1.
        key_cache, value_cache: (num_blocks, block_size, kv_heads, head_dim), q's dtype and device;
            heads % kv_heads == 0 (query head h reads kv head h // (heads // kv_heads)). Or the
            ``QuantizedPages`` of a quantized pool (``PagedKVCache(..., kv_dtype="int8")``'s
            ``key_cache(layer)``, ``value_cache(layer)``), read in place by the native decode kernel and
            dequantized per gathered tile elsewhere.
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
        metadata: a ``PagedMetadata`` from ``paged_metadata(block_table, cache_seqlens, cu_seqlens_q,
            ...)``, built once per engine step for all its layers: the call then skips validating
            them. block_table, cache_seqlens and cu_seqlens_q may then be None (else they must be the
            tensors it was built from).
        sinks: (heads,) float32 or q's dtype: learnable sink logits (gpt-oss), one per query head, joining
            the softmax denominator with no value (``memattn.attention``'s sinks; lse includes them).
    Returns:
        out shaped like q, in q's dtype (rows with no visible key: 0, lse -inf), or (out, lse).

    Scratch memory is bounded: a decode step gathers ``DECODE_SCRATCH_BYTES`` of keys (and of values)
    for all sequences; prefill gathers at most ``PREFILL_BLOCK_K`` tokens (plus one block) at a time.
    """
    batch = _prepare(q, key_cache, value_cache, block_table, cache_seqlens, cu_seqlens_q, softmax_scale,
                     causal, window_size, alibi_slopes, softcap, metadata)
    spec, qp, md = batch.spec, batch.q, batch.md
    check_sinks(sinks, qp.shape[1], qp.dtype, qp.device)
    backend = kernels.choose(qp, softcap=spec.softcap)
    cd = kernels.compute_dtype(qp.dtype)
    h = qp.shape[1]
    if md.decode and md.decode_q_rows is None:  # a pure decode step: no scatter into the packed rows
        with torch.no_grad():
            o, l = _decode_rows(qp, key_cache, value_cache, md, spec, backend)
        return _finish(batch, o, l.transpose(0, 1), return_lse, sinks)
    out = torch.zeros(qp.shape, dtype=cd, device=qp.device)
    lse = torch.full((h, qp.shape[0]), float("-inf"), dtype=cd, device=qp.device)
    with torch.no_grad():
        if md.decode:
            o, l = _decode_rows(qp, key_cache, value_cache, md, spec, backend)
            out[md.decode_q_rows], lse[:, md.decode_q_rows] = o, l.transpose(0, 1)
        for b, (q0, lq) in enumerate(zip(md.q_starts, md.q_lens)):
            if lq < 2:
                continue
            o, l = _prefill_sequence(qp[q0:q0 + lq].unsqueeze(0), key_cache, value_cache, md.block_table[b],
                                     md.ctx_lens[b], _row_spec(spec, b), backend.tiles)
            out[q0:q0 + lq], lse[:, q0:q0 + lq] = o[0], l[0]
    return _finish(batch, out, lse, return_lse, sinks)


def paged_decode_step(q, key_cache, value_cache, metadata: PagedMetadata, *, softmax_scale=None,
                      window_size=(-1, -1)):
    """A pure decode step's attention bound once for all the layers sharing `metadata`, scale and window.

    Validates exactly as ``paged_attention(q, key_cache, value_cache, None, None, softmax_scale=...,
    causal=True, window_size=window_size, metadata=metadata)`` would for the step's first layer, and
    returns run(q, key_cache, value_cache) -> out (shaped like q, q's dtype) that later layers call with
    their own q and caches (same shapes and dtypes; each call checks only that). Returns None where the
    step is not a pure decode step (some sequence has several queries) or the native decode kernel does
    not take it: then call ``paged_attention`` per layer.
    """
    batch = _prepare(q, key_cache, value_cache, None, None, None, softmax_scale, True, window_size, None, 0.0,
                     metadata)
    spec, qp, md = batch.spec, batch.q, batch.md
    if not md.decode or md.decode_q_rows is not None or spec.alibi_slopes is not None or spec.softcap \
            or not isinstance(key_cache, torch.Tensor):
        return None
    backend = kernels.choose(qp, softcap=spec.softcap)
    ranges = md.decode_ranges(spec.mask.left if spec.mask is not None else -1)
    kernel = kernels.choose_decode(qp, key_cache.dtype, backend, alibi=False, softcap=0.0, ranges=ranges.shape[1])
    if kernel is None or kernel.name != "native":
        return None
    from ..kernels import paged_native

    run = paged_native.bind(md.decode_table, ranges, num_heads=qp.shape[1], cache_shape=tuple(key_cache.shape),
                            cache_dtype=key_cache.dtype, scale=spec.scale)
    shape, dtype = batch.shape, q.dtype

    def step(q, key_cache, value_cache):
        if q.shape != shape or q.dtype != dtype:
            raise ValueError(f"the bound decode step takes q {tuple(shape)} {dtype}, got {tuple(q.shape)} {q.dtype}")
        return run(q.view(qp.shape), key_cache, value_cache).to(dtype).view(shape)

    return step


__all__ = ["paged_attention", "paged_decode_step", "paged_attention_reference", "paged_metadata", "PagedMetadata"]
