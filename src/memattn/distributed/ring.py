"""Ring attention: the sequence is sharded across ranks; key/value blocks travel around a ring.

Each of the P ranks keeps its queries. Keys and values travel in *pieces* (a block cut into up to
32): piece c of every rank's block goes once around the ring, a rank computing with the piece it
holds while the next is in flight, then piece c + 1. Partial results merge into a running
(out, lse) in float32 through ``memattn.ops.blockwise``. After every piece of every block has
visited, each rank holds the exact attention of its queries over the whole sequence. The backward
repeats the schedule, recomputing probabilities from the saved lse; a piece's dK/dV partial sum
follows the piece from rank to rank and finally goes home to its owner. Pieces rather than whole
blocks keep what a rank holds beyond its own out, dq, dk, dv to a fraction of a shard.

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
from ..ops.blockwise import FlashFunction, blockwise_backward, blockwise_forward
from ..ops.schedule import Problem
from ..ops.spec import AttentionSpec
from .comm import RingComm, RingError, agree, all_gather, dtype_code, group_info

LAYOUTS = ("contiguous", "zigzag")
# Two tags each (k, v): K/V, the dK/dV partial sums and the finished dK/dV going home may all be in
# flight at once between the same two ranks (at P = 2 "home" is the next rank too).
_KV_TAG, _DKV_TAG, _HOME_TAG = 10, 20, 30

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


def _piece_edges(length: int, layout: str, keys: int, most: int) -> list[tuple[int, int]]:
    """A block of `length` keys cut into pieces [a, b) of about `keys` keys, at most `most` of them,
    in the order they travel.

    Zigzag: each half is cut separately (no piece straddles the two
    sequence chunks a rank holds) and the halves alternate, first[0], second[0], first[1], ...:
    under a causal mask a rank sees only the first half of a block from a lower rank but the whole
    block from a higher one, so alternating keeps the work of consecutive ring steps even across ranks.
    """
    if layout == "contiguous" or length < 2:
        spans = [(0, length)]
    else:
        spans = [(0, length // 2), (length // 2, length)]
    per_span = max(1, min(most // len(spans), -(-(spans[0][1] - spans[0][0]) // keys)))
    cut = [[(lo + (hi - lo) * i // per_span, lo + (hi - lo) * (i + 1) // per_span) for i in range(per_span)]
           for lo, hi in spans]
    return [c for group in zip(*cut) for c in group if c[1] > c[0]]


def _piece_tiles(layout: str, causal: bool, rank: int, src: int, length: int, a: int, b: int):
    """[(query slice, key slice within the piece, causal diagonal?)] for this rank's queries against
    keys [a, b) of the block (`length` keys) that started on rank `src`. Causal: the queries hold
    the same `length` positions; otherwise every query sees every key, whatever their number."""
    def keys(lo, hi):  # block keys [lo, hi) intersected with the piece, in piece coordinates
        lo, hi = max(lo, a), min(hi, b)
        return slice(lo - a, hi - a) if hi > lo else None

    if not causal:
        pairs = [(_ALL, keys(0, length), False)]
    elif src == rank:  # own block: query i sees key j <= i (local order is global order, both layouts)
        pairs = [(slice(a, b), keys(a, b), True), (slice(b, length), keys(a, b), False)]
    elif layout == "contiguous":
        pairs = [(_ALL, keys(0, length), False)] if src < rank else []
    elif src < rank:  # zigzag: all our queries come after the block's first chunk, before its second
        pairs = [(_ALL, keys(0, length // 2), False)]
    else:  # only our second chunk comes after the (whole) block
        pairs = [(slice(length // 2, length), keys(0, length), False)]
    return [(qs, ks, diag) for qs, ks, diag in pairs if ks is not None and (qs.stop or length) != qs.start]


@dataclass(frozen=True)
class _Ring:
    """What one call needs beyond the tensors: the ring, the layout and the two tile specs."""

    comm: RingComm
    layout: str
    causal: bool
    scale: float

    def plan(self, length: int, keys: int, most: int):
        """(piece edges, {(source rank, piece index): [(query slice, key slice, spec)]}) for blocks of
        `length` keys, built once per call; pieces of about `keys` keys, at most `most`, and one
        piece on a ring of one."""
        full = AttentionSpec(scale=self.scale)
        diag = AttentionSpec(scale=self.scale, mask=causal_mask())
        edges = _piece_edges(length, self.layout, keys, most) if self.comm.world > 1 else [(0, length)]
        tiles = {(src, c): [(qs, ks, diag if d else full)
                            for qs, ks, d in _piece_tiles(self.layout, self.causal, self.comm.rank, src, length, a, b)]
                 for src in range(self.comm.world) for c, (a, b) in enumerate(edges)}
        return edges, tiles


# K/V (and in the backward their gradients) travel in pieces of a block: a rank then holds a few
# pieces in flight instead of whole blocks. The backward sets the peak (out, dq, dk, dv are all
# alive), so its pieces are small, about 10 of them alive at once: <= 1/32 of a block each, but at
# least 512 keys, since the fused CPU backward costs more per key on smaller tiles.
# The forward holds only out, so it takes larger pieces: each piece merges into out once per
# query block, and a merge costs a fair share of a small tile. (Measured costs: BENCHMARKS.md, "Ring".)
RING_PIECE, RING_PIECES = 512, 32
RING_FORWARD_PIECE, RING_FORWARD_PIECES = 2048, 4
# Query block of the forward's tiles (the fused kernel loops over keys itself). Its merge
# temporaries are a few query blocks of out; the forward's peak (out plus pieces) stays below the
# backward's (out, dq, dk, dv) for blocks up to a quarter of the shard.
RING_FORWARD_BLOCK_Q = 4096


def _tile_blocks(backend, length: int) -> tuple[int, int]:
    """(forward block, backward block), square so a causal diagonal stays one kernel-causal tile.
    Both start from the backend's default block (the torch tile materialises scores, so its default
    is small). A backend whose cost is per call (``large_tiles``: the fused CPU kernel) takes larger
    forward query blocks; its backward temporaries grow with the tile, so the backward keeps the
    default of single-process attention."""
    block = backend.default_block
    if not backend.large_tiles:
        return block, block
    return max(block, min(RING_FORWARD_BLOCK_Q, length // 4)), block


def _whole(q, k):
    """The schedule's problem list for one (query slice, key piece) pair: a single problem."""
    return (Problem(0, q.shape[1], 0, k.shape[1]),)


def _own_piece(x, a, b):
    """Keys [a, b) of this rank's block, contiguous (a copy only when batch > 1) so it can be sent."""
    return x[:, a:b].contiguous()


def _ring_forward(q, k, v, ring: _Ring):
    """out (B, L, H, D) and lse (B, H, L) in the compute dtype, for this rank's L queries.

    Piece by piece: piece c of every block goes once around the ring (step s holds piece c of the
    block of rank - s) while the next one is in flight, then piece c + 1.
    """
    b, lq, h, d = q.shape
    cd = kernels.compute_dtype(q.dtype)
    out = torch.zeros(b, lq, h, d, dtype=cd, device=q.device)
    lse = torch.full((b, h, lq), float("-inf"), dtype=cd, device=q.device)
    backend = kernels.choose(q)
    block_q, _ = _tile_blocks(backend, lq)
    edges, plan = ring.plan(k.shape[1], RING_FORWARD_PIECE, RING_FORWARD_PIECES)
    for c, (a, e) in enumerate(edges):
        own = (_own_piece(k, a, e), _own_piece(v, a, e))
        for _, src, (kc, vc) in ring.comm.rotate(own, _KV_TAG, f"ring attention forward: K/V piece {c}"):
            for qs, ks, spec in plan[src, c]:
                blockwise_forward(q[:, qs], kc[:, ks], vc[:, ks], spec, _whole(q[:, qs], kc[:, ks]), block_q,
                                  block_q, backend, into=(out[:, qs], lse[:, :, qs]))
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, dlse, ring: _Ring):
    """dq (B, L, H, D), dk, dv (B, L, Hkv, D) in the input dtypes.

    The forward's piece order, with each piece's dK/dV travelling behind it. At every step a rank
    computes its share of the visiting piece's gradients into fresh buffers while the partial sum
    of the ranks before it is in flight, adds it afterwards and passes the sum on with its next
    step's batch (so each transfer overlaps a step of compute); after the last rank the sum goes
    home to the piece's owner, which stores it in its dk/dv. All of a step's messages go out in one
    batch at its start: the previous step's dK/dV sum (or, at step 0, a finished piece going home)
    and the K/V piece of the next step.
    """
    comm, world = ring.comm, ring.comm.world
    cd = kernels.compute_dtype(q.dtype)
    backend = kernels.choose(q)
    if dlse is not None and not backend.dlse:  # the backward hands the call to one that takes dlse
        backend = kernels.choose(q, dlse=True, honour_forced=False)
    _, block = _tile_blocks(backend, q.shape[1])
    edges, plan = ring.plan(k.shape[1], RING_PIECE, RING_PIECES)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = torch.empty(k.shape, dtype=cd, device=k.device)
    dv = torch.empty(v.shape, dtype=cd, device=v.device)
    outgoing = []  # [(tag, tensor)] finished by the last step, sent with the next step's batch
    for c, (a, e) in enumerate(edges):
        kv = (_own_piece(k, a, e), _own_piece(v, a, e))
        for step in range(world):
            src = (comm.rank - step) % world
            if world == 1:  # no ring: accumulate straight into the result
                grads = (dk[:, a:e].zero_(), dv[:, a:e].zero_())
            else:
                grads = (torch.zeros(kv[0].shape, dtype=cd, device=k.device),
                         torch.zeros(kv[1].shape, dtype=cd, device=v.device))
                # Receives in the order of the sender's sends (a finished sum, then K/V): NCCL
                # matches a pair's messages by order, not by tag.
                recvs = []
                if step > 0:  # the previous ranks' dK/dV of this piece
                    recvs += [(_DKV_TAG, grads[0]), (_DKV_TAG + 1, grads[1])]
                elif c > 0:  # our previous piece's finished dK/dV, home from the last rank
                    a0, e0 = edges[c - 1]
                    recvs += [(_HOME_TAG, dk[:, a0:e0]), (_HOME_TAG + 1, dv[:, a0:e0])]
                if step + 1 < world:  # the next step's K/V piece
                    outgoing += [(_KV_TAG, kv[0]), (_KV_TAG + 1, kv[1])]
                    recvs += [(_KV_TAG, kv[0]), (_KV_TAG + 1, kv[1])]
                pending = comm.exchange(outgoing, recvs, f"ring attention backward: piece {c}, step {step}")
            for qs, ks, spec in plan[src, c]:
                blockwise_backward(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs],
                                   None if dlse is None else dlse[:, :, qs], spec, _whole(q[:, qs], kv[0][:, ks]),
                                   block, block, backend, into=(dq[:, qs], grads[0][:, ks], grads[1][:, ks]))
            if world == 1:
                continue
            received = list(pending.wait())
            if step > 0:
                grads[0].add_(received.pop(0))
                grads[1].add_(received.pop(0))
            elif c > 0:
                dk[:, a0:e0], dv[:, a0:e0] = received.pop(0), received.pop(0)
            if step + 1 < world:
                kv = (received.pop(0), received.pop(0))
            tag = _DKV_TAG if step + 1 < world else _HOME_TAG
            outgoing = [(tag, grads[0]), (tag + 1, grads[1])]
    if world > 1:  # the last piece comes home
        a0, e0 = edges[-1]
        pending = comm.exchange(outgoing, [(_HOME_TAG, dk[:, a0:e0]), (_HOME_TAG + 1, dv[:, a0:e0])],
                                "ring attention backward: last piece home")
        dk[:, a0:e0], dv[:, a0:e0] = pending.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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
    out, lse = FlashFunction.apply(q, k.contiguous(), v.contiguous(), lambda *x: _ring_forward(*x, ring),
                                   lambda dout, *rest: _ring_backward(dout.contiguous(), *rest, ring))
    return (out, lse) if return_lse else out


__all__ = ["ring_attention", "shard", "unshard", "RingError", "LAYOUTS"]
