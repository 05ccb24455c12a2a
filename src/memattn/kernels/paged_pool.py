"""Zero-copy paged decode: one fused-kernel call over the block pool, then a log-sum-exp merge per sequence.

Follows the ``paged_decode`` contract. The gather schedule (``ops.paged._decode_gather``) copies every
visible block into scratch before attending, an extra pass over the KV bytes. Here nothing is copied:

1. The pool ``(num_blocks, block_size, Hkv, D)`` is already a batch of key tiles: viewed as
   ``(num_blocks, Hkv, block_size, D)`` (a permutation, unit last stride) it is a valid (B, H, S, D)
   operand of the fused CPU flash kernel. Values likewise.
2. Every (sequence b, logical block j) the decode step needs is a *pair*; its physical block
   ``p = block_table[b, j]`` gets b's query. GQA folds the g = H / Hkv query heads of a kv head into
   the tile's query rows, so the query pool is ``(n, Hkv, g, D)`` (a gather of B*H*D-sized rows).
3. One kernel call over the contiguous id range ``[min p, max p]`` of the used blocks; unused blocks
   in that range attend a zero query and are ignored (cheaper than compacting them, which would copy).
   A broadcast mask ``(n, 1, 1, block_size)`` exists only when some pair is partial (the last block of
   a sequence, a sliding window's first block); a fully masked tile gets lse -inf.
4. Blocks used by several pairs (prefix caching, forks, or one table naming a block twice) are split
   into *layers*: layer r holds the r-th user of every block, so each layer names a block at most once.
   Layer 0 is the bulk; each further layer is one more call, zero-copy over its id range when that range
   is at most ``_RANGE_SLACK`` x its block count, else on its blocks gathered into a compact copy.
5. Fewer, larger tiles: the kernel's cost per (block, head) item dominates 16-token blocks, so an aligned
   run of ``VIRTUAL_BLOCKS`` consecutive physical blocks (ids p..p+vb-1 with p % vb == 0, at logical
   blocks J*vb..) is one pair of a second zero-copy view of the pool, ``(num_blocks // vb, vb *
   block_size, Hkv, D)``. Sequential allocation makes such runs common; a fragmented pool has none and
   everything stays in single blocks.
6. Per-pair partial results ``(out, lse)`` are merged per sequence by a segment log-sum-exp
   (``merge.merge_segments``: ``scatter_reduce`` amax, ``index_add_``). A sequence without any
   visible key gets out 0 and lse -inf, never NaN.

Covers the fused CPU kernel's features (float64/32/16, bf16; causal or not; sliding window; scale).
ALiBi, softcap and non-CPU devices stay on the gather schedule (``ops.paged._decode_gather``).
"""
from __future__ import annotations

import torch

from . import cpu_flash
from .merge import merge_segments
from .paged_decode import require_plain
from .torch_tiles import compute_dtype

# A layer's blocks are attended in place when their id range is at most this many times their count.
_RANGE_SLACK = 4
# Runs of this many consecutive physical blocks (aligned in the pool and in the table) become one tile.
VIRTUAL_BLOCKS = 8


def _layers(phys):
    """Split pair indices so that each group names every physical block at most once."""
    order = torch.argsort(phys, stable=True)
    sp = phys[order]
    new = torch.ones_like(sp, dtype=torch.bool)
    new[1:] = sp[1:] != sp[:-1]
    group_start = torch.cummax(torch.where(new, torch.arange(sp.numel(), device=sp.device), 0), 0).values
    rank = torch.empty_like(order)
    rank[order] = torch.arange(sp.numel(), device=sp.device) - group_start
    n_layers = int(rank.max()) + 1 if rank.numel() else 0
    if n_layers == 1:
        return [torch.arange(phys.numel(), device=phys.device)]
    return [(rank == r).nonzero(as_tuple=True)[0] for r in range(n_layers)]


def _attend_layer(qx, key_cache, value_cache, seq, phys, vis, scale, dummy):
    """Pairs (sequence `seq`, distinct block `phys`) (m,), queries qx (B, Hkv, g, D), visible slots vis (m, bs) or None.

    Returns out (n, H, D), lse (n, H) in the compute dtype and each row's sequence (n,) (``dummy`` for rows
    of blocks in the attended range that no pair uses: their result is to be dropped)."""
    m = phys.numel()
    lo, hi = int(phys.min()), int(phys.max()) + 1
    if hi - lo <= _RANGE_SLACK * m:  # attend in place over the id range
        n = hi - lo
        k, v = key_cache[lo:hi], value_cache[lo:hi]
        row_seq = torch.full((n,), dummy, dtype=torch.int64, device=seq.device)
        row_seq[phys - lo] = seq
        if vis is not None:
            mask = torch.ones((n, vis.shape[1]), dtype=torch.bool, device=vis.device)
            mask[phys - lo] = vis
            vis = mask
    else:  # few blocks spread over a wide range: gather just those (a copy of m blocks)
        k, v = key_cache.index_select(0, phys), value_cache.index_select(0, phys)
        row_seq = seq
    b, hkv, g, d = qx.shape
    # queries in pool order: one gather, rows of unused blocks read sequence 0 (finite, dropped later)
    qbuf = qx.index_select(0, torch.where(row_seq == dummy, 0, row_seq))
    mask = None if vis is None else vis[:, None, None, :]  # (n, 1, 1, bs): broadcast over heads and rows
    # (n, g, Hkv, D) / (n, bs, Hkv, D) in memattn's layout; the tile views them as (B, H, S, D), no copies.
    o, lse = cpu_flash.tile_forward(qbuf.transpose(1, 2), k, v, scale=scale, mask=mask)
    # query head kv * g + j is row (kv, j): (n, Hkv, g, D) -> (n, H, D)
    return o.transpose(1, 2).reshape(-1, hkv * g, d), lse.reshape(-1, hkv * g), row_seq


def _virtual_runs(block_table, live, vb):
    """Which aligned runs of `vb` logical blocks are `vb` consecutive physical blocks starting at a multiple of vb.

    Returns covered (B, width) bool, and the runs as seq, run index J (logical blocks J*vb ...), virtual id."""
    b, width = live.shape
    w = width // vb * vb
    t = block_table[:, :w].to(device=live.device, dtype=torch.int64).view(b, w // vb, vb)
    ok = (t[..., 0] % vb == 0) & (t == t[..., :1] + torch.arange(vb, device=t.device)).all(-1)
    ok &= live[:, :w].view(b, w // vb, vb).all(-1)
    covered = torch.zeros_like(live)
    covered[:, :w] = ok.repeat_interleave(vb, dim=1)
    seq, run = ok.nonzero(as_tuple=True)
    return covered, seq, run, t[seq, run, 0] // vb


def decode(q, key_cache, value_cache, block_table, ranges, *, scale, softcap=0.0, alibi_slopes=None,
           query_pos=None, sinks=None, kv_scales=None):
    """The ``paged_decode`` contract (see the module docstring for the schedule); no softcap or ALiBi
    (its record says so). q (B, H, D) -> out (B, H, D), lse (B, H) in the compute dtype."""
    require_plain("pool", ranges, sinks, kv_scales)
    if not isinstance(key_cache, torch.Tensor):
        raise ValueError("the pool decode kernel reads full-width caches only (its record lists no KV format)")
    if softcap or alibi_slopes is not None:
        raise ValueError("the pool decode kernel has no softcap or ALiBi (the fused CPU kernel has neither)")
    nblocks, bs, hkv, d = key_cache.shape
    b, h, _ = q.shape
    dev = q.device
    start, lens = ranges[:, 0, 0], ranges[:, 0, 1]
    first, end = start // bs, (lens + bs - 1) // bs
    width = int(end.max()) if b else 0
    cols = torch.arange(width, device=dev)
    live = (cols >= first.unsqueeze(1)) & (cols < end.unsqueeze(1))  # (B, width) logical blocks to read
    table = block_table[:, :width].to(device=dev, dtype=torch.int64)
    views = []  # (key view, value view, pairs' sequences, pairs' logical block index in that view, ids in the view)
    vb = VIRTUAL_BLOCKS
    if vb > 1 and width >= vb and nblocks >= vb:
        covered, vseq, vrun, vid = _virtual_runs(table, live, vb)
        if vseq.numel():
            nv = nblocks // vb * vb
            views.append((key_cache[:nv].view(nv // vb, vb * bs, hkv, d), value_cache[:nv].view(nv // vb, vb * bs, hkv, d),
                          vseq, vrun, vid))
            live = live & ~covered
    seq, col = live.nonzero(as_tuple=True)
    if seq.numel():
        views.append((key_cache, value_cache, seq, col, table[seq, col]))
    qx = q.reshape(b, hkv, h // hkv, d)
    parts = []
    for kview, vview, seq, col, phys in views:
        size = kview.shape[1]
        pos = col.unsqueeze(1) * size + torch.arange(size, device=dev)  # (P, size) logical token positions
        vis = (pos >= start[seq].unsqueeze(1)) & (pos < lens[seq].unsqueeze(1))
        for idx in _layers(phys):
            v = vis[idx]
            parts.append(_attend_layer(qx, kview, vview, seq[idx], phys[idx], None if bool(v.all()) else v, scale, b))
    if not parts:  # no sequence sees a key (or there are none)
        cd = compute_dtype(q.dtype)
        return torch.zeros((b, h, d), dtype=cd, device=dev), torch.full((b, h), float("-inf"), dtype=cd, device=dev)
    out, lse = merge_segments(parts, b + 1)  # row b collects the dropped rows of unused blocks
    return out[:b], lse[:b]
