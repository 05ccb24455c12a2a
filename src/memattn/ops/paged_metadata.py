"""Paged metadata (block table, context lengths, packed query offsets), validated once per engine step.

``paged_attention`` validates these on every call. An engine step calls it once per layer with the
same tensors, so it may instead build a ``PagedMetadata`` once (``paged_metadata``) and pass it to
every layer's call; each call then checks only what depends on q and the caches.
"""
from __future__ import annotations

import dataclasses

import torch

from .._validate import FLOAT_DTYPES, check_int32
from ..cache.kv_formats import QuantizedPages
from ..kernels.paged_decode import visible_ranges


@dataclasses.dataclass(frozen=True)
class PagedMetadata:
    """One step's validated paged metadata. Build it with ``paged_metadata``.

    block_table, cache_seqlens, cu_seqlens_q: the tensors it checked. num_blocks, block_size: the
    pool it was checked against. seqlen_q: queries per sequence of an unpacked q (batch, seqlen_q,
    H, D); None for packed q. q_starts, q_lens, ctx_lens: per sequence, its first packed query row,
    its query count and its context length (Python ints). decode: the sequences with one query;
    decode_table (len(decode), max_blocks) and decode_lens int64 (len(decode),): their block-table
    rows and context lengths; decode_q_rows: their packed query rows (None when all decode, and
    decode_table is then block_table itself).
    """

    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None
    num_blocks: int
    block_size: int
    seqlen_q: int | None
    q_starts: list
    q_lens: list
    ctx_lens: list
    decode: list
    decode_table: torch.Tensor
    decode_lens: torch.Tensor
    decode_q_rows: torch.Tensor | None
    # the decode rows' visible ranges per window left edge: built by the first layer, read by the rest
    _ranges: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def packed(self) -> bool:
        return self.seqlen_q is None

    def decode_ranges(self, window_left: int) -> torch.Tensor:
        """int64 (len(decode), 1, 2) visible key ranges of the decode rows (``kernels.paged_decode``)."""
        r = self._ranges.get(window_left)
        if r is None:
            r = self._ranges[window_left] = visible_ranges(self.decode_lens, window_left)
        return r


def _query_lens(cu_seqlens_q, batch, seqlen_q):
    if cu_seqlens_q is None:
        return [seqlen_q] * batch
    check_int32("cu_seqlens_q", cu_seqlens_q, 1)
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_q must have batch + 1 = {batch + 1} entries, got {cu_seqlens_q.shape[0]}")
    cu = cu_seqlens_q.tolist()
    if cu[0] != 0 or any(a > b for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens_q must rise from 0, got {cu}")
    return [b - a for a, b in zip(cu, cu[1:])]


def _check_contexts(block_table, cache_seqlens, q_lens, ctx, num_blocks, bs):
    max_tokens = block_table.shape[1] * bs
    for b, (lq, lk) in enumerate(zip(q_lens, ctx)):
        if lk > max_tokens:
            raise ValueError(f"cache_seqlens[{b}] = {lk} exceeds what block_table covers "
                             f"({block_table.shape[1]} blocks x {bs} = {max_tokens} tokens)")
        if lk < lq:
            raise ValueError(f"cache_seqlens[{b}] = {lk} is shorter than its {lq} queries: cache_seqlens counts "
                             "the new tokens, which must already be written into the cache")
    used = torch.arange(block_table.shape[1]).unsqueeze(0) < ((cache_seqlens.long().cpu() + bs - 1) // bs).unsqueeze(1)
    table = block_table.cpu()
    # one fused test over the used entries (no boolean gather: it costs more than the rest of a decode step's checks)
    if block_table.numel() and bool(((table < 0) | (table >= num_blocks)).logical_and_(used).any()):
        ids = table[used]
        bad = ids[(ids < 0) | (ids >= num_blocks)][0]
        raise ValueError(f"block_table holds block id {int(bad)} out of range [0, {num_blocks})")


def paged_metadata(block_table, cache_seqlens, cu_seqlens_q=None, *, num_blocks: int, block_size: int,
                   seqlen_q: int = 1) -> PagedMetadata:
    """Validate a step's paged metadata once, for all the layers that attend with it.

    Args:
        block_table, cache_seqlens, cu_seqlens_q: as ``paged_attention`` takes them, on one device.
        num_blocks, block_size: the pool's first two sizes (``key_cache.shape[:2]``).
        seqlen_q: queries per sequence of an unpacked q (no cu_seqlens_q); ignored for packed q.
    Returns:
        a ``PagedMetadata`` for ``paged_attention(..., metadata=...)``.
    Raises ValueError / TypeError naming the offending sizes, as ``paged_attention`` does.
    """
    check_int32("block_table", block_table, 2)
    check_int32("cache_seqlens", cache_seqlens, 1)
    dev = block_table.device
    for name, t in (("cache_seqlens", cache_seqlens), ("cu_seqlens_q", cu_seqlens_q)):
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but block_table is on {dev}")
    batch = block_table.shape[0]
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens has {cache_seqlens.shape[0]} entries but block_table has {batch} rows")
    q_lens = _query_lens(cu_seqlens_q, batch, seqlen_q)
    ctx = cache_seqlens.tolist()
    _check_contexts(block_table, cache_seqlens, q_lens, ctx, num_blocks, block_size)
    starts = [0]
    for lq in q_lens[:-1]:
        starts.append(starts[-1] + lq)
    decode = [b for b, lq in enumerate(q_lens) if lq == 1]
    if len(decode) == batch:  # a pure decode step: the whole tensors, no row selection
        table, q_rows, dec_ctx = block_table, None, ctx
    else:
        table = block_table.index_select(0, torch.tensor(decode, dtype=torch.int64, device=dev))
        q_rows = torch.tensor([starts[b] for b in decode], dtype=torch.int64, device=dev)
        dec_ctx = [ctx[b] for b in decode]
    lens = torch.tensor(dec_ctx, dtype=torch.int64, device=dev)
    return PagedMetadata(block_table, cache_seqlens, cu_seqlens_q, num_blocks, block_size,
                         None if cu_seqlens_q is not None else seqlen_q, starts, q_lens, ctx, decode, table, lens,
                         q_rows)


def check_call(q, key_cache, value_cache, packed: bool):
    """What every call checks: tensor types, dtypes, devices, head sizes of q and the caches."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(t, (torch.Tensor, QuantizedPages)):
            raise TypeError(f"{name} must be a torch.Tensor or a QuantizedPages, got {type(t).__name__}")
    if isinstance(key_cache, QuantizedPages) or isinstance(value_cache, QuantizedPages):
        if not (isinstance(key_cache, QuantizedPages) and isinstance(value_cache, QuantizedPages)
                and key_cache.format == value_cache.format and (key_cache.side, value_cache.side) == ("k", "v")):
            raise TypeError("key_cache and value_cache must be the keys and values of one quantized pool "
                            "(PagedKVCache.key_cache(layer), .value_cache(layer)), or both tensors")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q dtype must be one of float16/bfloat16/float32/float64, got {q.dtype}")
    want = 3 if packed else 4
    if q.dim() != want:
        layout = "(total_q, heads, head_dim) with cu_seqlens_q" if packed else "(batch, seqlen_q, heads, head_dim)"
        raise ValueError(f"q must be {layout}, got shape {tuple(q.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError("key_cache and value_cache must both be (num_blocks, block_size, kv_heads, head_dim), "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise TypeError(f"q, key_cache, value_cache must share a dtype, got {q.dtype}, {key_cache.dtype}, "
                        f"{value_cache.dtype}")
    if key_cache.device != q.device or value_cache.device != q.device:
        raise ValueError(f"q and the caches must be on one device, got {q.device}, {key_cache.device}")
    hkv, d = key_cache.shape[2:]
    h = q.shape[-2]
    if q.shape[-1] != d:
        raise ValueError(f"q head_dim {q.shape[-1]} != cache head_dim {d}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of cache kv heads ({hkv})")


def check_fits(md: PagedMetadata, q, key_cache):
    """The metadata was built for these sizes: q's rows, the pool's blocks, q's device."""
    if tuple(key_cache.shape[:2]) != (md.num_blocks, md.block_size):
        raise ValueError(f"metadata was built for a pool of {md.num_blocks} blocks of {md.block_size} tokens, "
                         f"but key_cache is {tuple(key_cache.shape)}")
    if md.block_table.device != q.device:
        raise ValueError(f"block_table is on {md.block_table.device} but q is on {q.device}")
    batch = md.block_table.shape[0]
    if md.packed:
        total = sum(md.q_lens)
        if q.shape[0] != total:
            raise ValueError(f"cu_seqlens_q must rise from 0 to total_q = {q.shape[0]}, but it ends at {total}")
    elif q.shape[0] != batch or q.shape[1] != md.seqlen_q:
        raise ValueError(f"q batch {q.shape[0]} x seqlen_q {q.shape[1]} != block_table rows {batch} x "
                         f"{md.seqlen_q} queries per sequence (the metadata's)")


def resolve(q, key_cache, value_cache, block_table, cache_seqlens, cu_seqlens_q, metadata) -> PagedMetadata:
    """The call's validated metadata: `metadata` checked against q and the caches, or built here."""
    if metadata is None:
        check_call(q, key_cache, value_cache, cu_seqlens_q is not None)
        metadata = paged_metadata(block_table, cache_seqlens, cu_seqlens_q, num_blocks=key_cache.shape[0],
                                  block_size=key_cache.shape[1], seqlen_q=q.shape[1])
    else:
        if not isinstance(metadata, PagedMetadata):
            raise TypeError(f"metadata must be a PagedMetadata (from paged_metadata), got {type(metadata).__name__}")
        for name, t, built in (("block_table", block_table, metadata.block_table),
                               ("cache_seqlens", cache_seqlens, metadata.cache_seqlens),
                               ("cu_seqlens_q", cu_seqlens_q, metadata.cu_seqlens_q)):
            if t is not None and t is not built:
                raise ValueError(f"{name} is not the tensor the metadata was built from (pass that one, or None)")
        check_call(q, key_cache, value_cache, metadata.packed)
    check_fits(metadata, q, key_cache)
    return metadata


__all__ = ["PagedMetadata", "paged_metadata"]
