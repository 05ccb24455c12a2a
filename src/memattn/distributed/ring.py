"""Ring attention: the sequence is sharded across ranks; key/value blocks travel around a ring.

Each of the P ranks keeps its queries. At step s it holds the K/V block that started on rank
r - s, runs the blockwise schedule of ``memattn.ops.blockwise`` on (its queries, that block),
and merges the result into its running (out, lse) in float32, while the next block is already
on its way. After P steps every rank holds the exact attention of its queries over the whole
sequence. The backward repeats the rotation, recomputing probabilities from the saved lse; the
dK/dV of a block travel with it and arrive back at their owner after P hops.

Layouts (S = P * L tokens, rank r holds L of them):

    contiguous  rank r holds tokens [r L, (r + 1) L)
    zigzag      the sequence is cut into 2P chunks of L / 2; rank r holds chunks r and 2P - 1 - r,
                so under a causal mask every rank does the same work. P = 2, chunks c0..c3:

                    rank 0: c0 c3      rank 1: c1 c2

Causal work of rank r against the block of rank src (1 = computed, diagonal = causal tile):

    contiguous  src == r: causal   src < r: everything   src > r: nothing
    zigzag      src == r: causal   src < r: all queries x first half of the block
                                   src > r: second half of the queries x the whole block
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from .._validate import check_dense_qkv, resolve_scale
from ..masks import causal as causal_mask
from ..ops.blockwise import Problem, blockwise_backward, blockwise_forward
from ..ops.dispatch import DEFAULT_BLOCK
from ..ops.spec import AttentionSpec
from .comm import RingComm, RingError, agree, all_gather, dtype_code, group_info

LAYOUTS = ("contiguous", "zigzag")
_KV_TAG, _DKV_TAG = 10, 20  # two tags each (k, v): a block and its gradient may be in flight at once

_ALL = slice(None)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def _chunks(seqlen: int, world: int, layout: str, what: str) -> int:
    """Chunk length: S / P (contiguous) or S / 2P (zigzag); raises if S does not split evenly."""
    parts = world if layout == "contiguous" else 2 * world
    if seqlen % parts:
        raise ValueError(f"{what}: sequence length {seqlen} does not split into {parts} equal chunks "
                         f"({layout} layout over {world} ranks); pad it to a multiple of {parts}")
    return seqlen // parts


def shard(x: torch.Tensor, group=None, layout: str = "contiguous") -> torch.Tensor:
    """This rank's part of a full sequence x (B, S, ...), identical on every rank -> (B, S / P, ...).

    contiguous: tokens [r S/P, (r+1) S/P). zigzag: chunks r and 2P-1-r of 2P. Differentiable; the
    result is a copy, so the full tensor may be freed.
    """
    _check_layout(layout)
    rank, world = group_info(group)
    if x.dim() < 2:
        raise ValueError(f"shard expects (batch, seqlen, ...), got shape {tuple(x.shape)}")
    c = _chunks(x.shape[1], world, layout, "shard")
    if layout == "contiguous":
        return x[:, rank * c:(rank + 1) * c].clone()
    j = 2 * world - 1 - rank
    return torch.cat([x[:, rank * c:(rank + 1) * c], x[:, j * c:(j + 1) * c]], dim=1)


def unshard(x: torch.Tensor, group=None, layout: str = "contiguous") -> torch.Tensor:
    """Inverse of ``shard``: gather every rank's (B, S / P, ...) part into the full (B, S, ...) on
    every rank. Not differentiable (use it for results and checks)."""
    _check_layout(layout)
    rank, world = group_info(group)
    shape_fields = {f"dim {i}": int(n) for i, n in enumerate(x.shape)}
    agree(group, {"ndim": x.dim(), **shape_fields, "dtype": dtype_code(x.dtype)}, None, "unshard")
    if layout == "zigzag":
        _chunks(x.shape[1], 1, layout, "unshard")  # each shard holds two equal chunks
    parts = all_gather(x.detach(), group, f"rank {rank}: unshard")
    if layout == "contiguous":
        return torch.cat(parts, dim=1)
    halves = [p.chunk(2, dim=1) for p in parts]
    order = [halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))]
    return torch.cat(order, dim=1)


def _step_tiles(layout: str, causal: bool, rank: int, src: int, half: int):
    """[(query slice, key slice, causal diagonal?)] for this rank's queries against the block of `src`."""
    if not causal:
        return [(_ALL, _ALL, False)]
    if src == rank:
        return [(_ALL, _ALL, True)]
    if layout == "contiguous":
        return [(_ALL, _ALL, False)] if src < rank else []
    if src < rank:
        return [(_ALL, slice(0, half), False)]
    return [(slice(half, None), _ALL, False)]


@dataclass(frozen=True)
class _Ring:
    """What one call needs beyond the tensors: the ring, the layout and the two tile specs."""

    comm: RingComm
    layout: str
    causal: bool
    scale: float

    def steps(self, q_len: int):
        """(spec, causal?) per tile for each source rank, built once per call."""
        full = AttentionSpec(scale=self.scale)
        diag = AttentionSpec(scale=self.scale, mask=causal_mask())
        return {src: [(qs, ks, diag if c else full)
                      for qs, ks, c in _step_tiles(self.layout, self.causal, self.comm.rank, src, q_len // 2)]
                for src in range(self.comm.world)}


# Tile edge cap: the ring keeps ~6 shard-sized buffers (out, dq, K/V, travelling dK/dV), so the
# schedule's per-tile temporaries must stay small next to them; 512 costs ~1% in Python overhead.
RING_BLOCK_MAX = 512


def _blocks(tiles) -> int:
    return min(RING_BLOCK_MAX, DEFAULT_BLOCK["cpu_flash" if tiles is kernels.cpu_flash else "torch"])


def _whole(q, k):
    """The schedule's problem list for one (query slice, key block) pair: a single problem."""
    return (Problem(0, q.shape[1], 0, k.shape[1]),)


def _ring_forward(q, k, v, ring: _Ring):
    b, lq, h, d = q.shape
    cd = kernels.compute_dtype(q.dtype)
    out = torch.zeros(b, lq, h, d, dtype=cd, device=q.device)
    lse = torch.full((b, h, lq), float("-inf"), dtype=cd, device=q.device)
    tiles = kernels.select(q)
    block = _blocks(tiles)
    plan = ring.steps(lq)
    for _, src, (kb, vb) in ring.comm.rotate((k, v), _KV_TAG, "ring attention forward: K/V"):
        for qs, ks, spec in plan[src]:
            blockwise_forward(q[:, qs], kb[:, ks], vb[:, ks], spec, _whole(q[:, qs], kb[:, ks]), block, block,
                              tiles, into=(out[:, qs], lse[:, :, qs]))
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, dlse, ring: _Ring):
    cd = kernels.compute_dtype(q.dtype)
    tiles = kernels.select(q)
    block = _blocks(tiles if dlse is None else kernels.torch_tiles)  # blockwise takes the torch tile for dlse
    plan = ring.steps(q.shape[1])
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dkb = dvb = None
    what = "ring attention backward: dK/dV"
    for step, src, (kb, vb) in ring.comm.rotate((k, v), _KV_TAG, "ring attention backward: K/V"):
        # dK/dV of this block so far: zero on its owner, then whatever the ranks before us added.
        if dkb is None:
            dkb = torch.zeros(kb.shape, dtype=cd, device=kb.device)
            dvb = torch.zeros(vb.shape, dtype=cd, device=vb.device)
        for qs, ks, spec in plan[src]:
            blockwise_backward(dout[:, qs], q[:, qs], kb[:, ks], vb[:, ks], out[:, qs], lse[:, :, qs],
                               None if dlse is None else dlse[:, :, qs], spec, _whole(q[:, qs], kb[:, ks]),
                               block, block, tiles,
                               into=(dq[:, qs], dkb[:, ks], dvb[:, ks]))
        if step + 1 < ring.comm.world:
            # In place and piecewise: holding our partial and the incoming one at once, next to the
            # K/V in flight, would make this hop the peak of the whole call (8 shards instead of 6).
            ring.comm.pass_on((dkb, dvb), _DKV_TAG, f"{what}, step {step}")
        del kb, vb
    ring.comm.pass_on((dkb, dvb), _DKV_TAG, f"{what}, return to owner")  # this rank's own block comes home
    return dq.to(q.dtype), dkb.to(k.dtype), dvb.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring):
        out, lse = _ring_forward(q, k, v, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(q)
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, dlse, ctx.ring)
        return dq, dk, dv, None


def _local_error(q, k, v, causal, layout) -> str | None:
    """This rank's input error, as text (None if fine); raised on every rank after the agreement."""
    try:
        check_dense_qkv(q, k, v)
        if causal and q.shape[1] != k.shape[1]:
            raise ValueError(f"causal ring attention needs equal query and key shards, got seqlen "
                             f"{q.shape[1]} and {k.shape[1]}")
        if causal and layout == "zigzag" and q.shape[1] % 2:
            raise ValueError(f"the zigzag layout holds two equal chunks per rank, so the shard length must "
                             f"be even, got {q.shape[1]}; pad the sequence to a multiple of 2 * world size")
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def ring_attention(q, k, v, *, group=None, causal=False, softmax_scale=None, layout="contiguous",
                   return_lse=False):
    """Exact attention over a sequence sharded across the ranks of `group` (a ring of P ranks).

    Call it on every rank with that rank's shard (see ``shard``); K/V blocks travel around the
    ring with point-to-point sends that overlap the current block's compute, partial results merge
    by their log-sum-exp in float32, and per-rank memory is O(S / P).

    Args:
        q: (batch, S / P, heads, head_dim), this rank's queries. k, v: (batch, S / P, kv_heads,
            head_dim), heads % kv_heads == 0 (GQA: query head h reads kv head h // (heads // kv_heads)).
        group: a torch.distributed process group (default: the world). Its timeout bounds every wait.
        causal: query i sees key j iff j <= i, positions taken in the full sequence (Sq == Sk).
        softmax_scale: default 1 / sqrt(head_dim).
        layout: "contiguous" (rank r holds tokens [r S/P, (r+1) S/P)) or "zigzag" (2P chunks; rank r
            holds chunks r and 2P-1-r, which balances causal work). Must match how q/k/v were sharded.
        return_lse: also return lse (batch, heads, S / P), float32 (float64 for float64 input),
            differentiable.
    Returns:
        out (batch, S / P, heads, head_dim) in q's dtype, or (out, lse).
    Raises:
        ValueError for a bad layout here, ``RingError`` on every rank when any rank's inputs are bad
        or disagree with the others, or when a peer fails or times out.
    """
    _check_layout(layout)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    comm = RingComm(group)
    error = _local_error(q, k, v, causal, layout)
    scale = resolve_scale(softmax_scale, q.shape[-1]) if error is None else 0.0
    shapes = {} if error is not None else {
        "q shape": q.shape, "k shape": k.shape, "v shape": v.shape}
    fields = {"dtype": dtype_code(q.dtype) if error is None else -1,
              "causal": int(causal), "layout": LAYOUTS.index(layout),
              "softmax_scale (float bits)": int(torch.tensor(scale, dtype=torch.float64).view(torch.int64)),
              **{f"{name} dim {i}": int(n) for name, s in shapes.items() for i, n in enumerate(s)}}
    if error is not None:  # keep the field count equal on every rank: pad with -1
        fields.update({f"pad {i}": -1 for i in range(12)})
    agree(group, fields, error, "ring_attention")
    ring = _Ring(comm, layout, causal, scale)
    out, lse = _RingAttention.apply(q, k.contiguous(), v.contiguous(), ring)
    return (out, lse) if return_lse else out


__all__ = ["ring_attention", "shard", "unshard", "RingError", "LAYOUTS"]
