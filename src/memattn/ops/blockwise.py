"""Blockwise (flash) attention: a schedule of tiles with an online-softmax merge.

Forward: for each query block, attend to every key tile the mask does not rule out, merging
partial results by their log-sum-exp; keep only ``out`` and ``lse``. Backward
(FlashAttention-2): recompute each tile's probabilities from the saved ``lse`` with
``delta = rowsum(dO * O) - dlse`` and accumulate dq, dk, dv. No Sq x Sk tensor is ever
allocated: the largest temporary is bounded by the tiles.

The tensors may hold several independent *problems* (packed variable-length sequences): each
problem is a query range and a key range with its own bottom-right alignment; masks and biases
are evaluated in the problem's local coordinates.

Tile kinds come from the mask's block layout (``memattn.masks``): EMPTY tiles are skipped,
FULL tiles run without a mask, PARTIAL tiles get an element mask (or, for an aligned causal
diagonal tile, the kernel's own causal flag). Two ways keep Python overhead small:

- runs of adjacent FULL tiles go to the tile primitive as one call (the fused CPU kernel tiles
  internally, so this stays O(S) memory);
- *bands*: when the mask and bias depend on i - j alone (sliding windows), consecutive query
  blocks whose visible keys have the same relative span share one tile pattern, so a band of
  them is computed in one call: query blocks stacked on the batch axis, their key windows taken
  as overlapping strided views of k and v (no copy), one relative mask for all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..masks import EMPTY, FULL, edges
from .merge import merge_attention
from .spec import AttentionSpec


@dataclass(frozen=True)
class Problem:
    """One attention problem inside the tensors: queries [q_start, q_start + q_len) attend to keys
    [k_start, k_start + k_len). `index` selects per-sequence parameters (ALiBi (B, H) slopes)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    index: int | None = None


@dataclass(frozen=True)
class Segment:
    """Keys [k0, k1) (absolute) for one query block; kind is 'full', 'causal' (aligned diagonal) or 'masked'."""

    k0: int
    k1: int
    kind: str


@dataclass(frozen=True)
class QueryBlock:
    q0: int
    q1: int
    segments: tuple
    problem: Problem


@dataclass(frozen=True)
class Band:
    """`count` query blocks of `block` rows from q0 (absolute), each seeing keys
    [its start + rel_k0, its start + rel_k0 + span) with one shared relative pattern."""

    q0: int
    count: int
    block: int
    rel_k0: int
    span: int
    problem: Problem


def _query_blocks(spec, prob: Problem, block_q: int, block_k: int, max_run: int) -> list[QueryBlock]:
    sq, sk = prob.q_len, prob.k_len
    qe, ke = edges(sq, block_q), edges(sk, block_k, sk - sq)
    if spec.mask is None:
        kinds = torch.full((len(qe) - 1, len(ke) - 1), FULL, dtype=torch.int8)
    else:
        kinds = spec.mask.block_kinds(sq, sk, qe, ke)
    qe_l, ke_l = qe.tolist(), ke.tolist()
    per_row: dict[int, list] = {a: [] for a in range(len(qe_l) - 1)}
    nz = (kinds != EMPTY).nonzero()  # only the tiles that run: O(visible tiles) from here on
    for (a, b), kind in zip(nz.tolist(), kinds[nz[:, 0], nz[:, 1]].tolist()):
        per_row[a].append((b, kind))
    blocks = []
    for a, cols in per_row.items():
        q0, q1 = qe_l[a], qe_l[a + 1]
        segs: list[Segment] = []
        for b, kind in cols:
            k0, k1 = ke_l[b], ke_l[b + 1]
            if kind == FULL:
                last = segs[-1] if segs else None
                if last is not None and last.kind == "full" and last.k1 == k0 and k1 - last.k0 <= max_run:
                    segs[-1] = Segment(last.k0, k1, "full")
                else:
                    segs.append(Segment(k0, k1, "full"))
            elif spec.mask.tile_is_causal_diagonal(sq, sk, q0, q1, k0, k1):
                segs.append(Segment(k0, k1, "causal"))
            else:
                segs.append(Segment(k0, k1, "masked"))
        shifted = tuple(Segment(s.k0 + prob.k_start, s.k1 + prob.k_start, s.kind) for s in segs)
        blocks.append(QueryBlock(q0 + prob.q_start, q1 + prob.q_start, shifted, prob))
    return blocks


# A band is worth it when its stacked key windows stay small next to a plain per-block call.
_BAND_MAX_SPAN = 4096
_BAND_MIN_COUNT = 4


def _bands(spec, blocks: list[QueryBlock], block_q: int) -> list:
    """Group consecutive full-size query blocks with the same relative key span into Bands;
    other blocks stay as they are. Only for translation-invariant masks and biases."""
    if not spec.translation_invariant or spec.mask is None:
        return blocks
    out, run = [], []

    def flush():
        if len(run) >= _BAND_MIN_COUNT:
            first = run[0]
            lo = first.segments[0].k0
            out.append(Band(first.q0, len(run), block_q, lo - first.q0, first.segments[-1].k1 - lo, first.problem))
        else:
            out.extend(run)
        run.clear()

    for blk in blocks:
        ok = blk.q1 - blk.q0 == block_q and blk.segments
        if ok:
            lo, hi = blk.segments[0].k0, blk.segments[-1].k1
            ok = hi - lo <= _BAND_MAX_SPAN
        if ok and run:
            prev = run[-1]
            same = (prev.problem is blk.problem and prev.q1 == blk.q0
                    and prev.segments[0].k0 - prev.q0 == lo - blk.q0 and prev.segments[-1].k1 - prev.q0 == hi - blk.q0)
            if not same:
                flush()
        if ok:
            run.append(blk)
        else:
            flush()
            out.append(blk)
    flush()
    return out


def plan(spec: AttentionSpec, problems, block_q: int, block_k: int, max_run: int, bands: bool = False) -> list:
    """The tile schedule: a list of QueryBlock (and Band, if `bands`), EMPTY tiles left out.

    Adjacent FULL tiles are merged into segments of at most `max_run` keys.
    Cost: O(number of tiles) to classify, O(visible tiles) to list.
    """
    items = []
    for prob in problems:
        blocks = _query_blocks(spec, prob, block_q, block_k, max_run)
        items.extend(_bands(spec, blocks, block_q) if bands else blocks)
    return items


def _local(prob: Problem, q0, q1, k0, k1):
    return prob.q_len, prob.k_len, q0 - prob.q_start, q1 - prob.q_start, k0 - prob.k_start, k1 - prob.k_start


def _tile_args(spec, prob: Problem, q0, q1, k0, k1, kind, device):
    sq, sk, lq0, lq1, lk0, lk1 = _local(prob, q0, q1, k0, k1)
    mask = spec.mask.element_mask(sq, sk, lq0, lq1, lk0, lk1, device) if kind == "masked" else None
    bias = spec.tile_bias(sq, sk, lq0, lq1, lk0, lk1, device, sequence=prob.index)
    return dict(scale=spec.scale, mask=mask, bias=bias, softcap=spec.softcap, causal=kind == "causal")


# Bands are computed in chunks of query blocks so that stacked key windows (and the torch tile's
# scores) stay within this many bytes.
_BAND_CHUNK_BYTES = 32 * 2**20


def _band_chunks(band: Band, q, k):
    b, h, d = q.shape[0], q.shape[2], q.shape[3]
    per_block = b * band.span * (2 * k.shape[2] * d + h * band.block) * 4
    step = max(1, _BAND_CHUNK_BYTES // per_block)
    for c0 in range(0, band.count, step):
        yield c0, min(step, band.count - c0)


def _stack_queries(x, q0, n, block):
    """(B, S, H, D) rows [q0, q0 + n*block) -> (B*n, block, H, D)."""
    b = x.shape[0]
    return x[:, q0:q0 + n * block].reshape(b * n, block, *x.shape[2:])


def _stack_windows(x, k0, n, block, span):
    """Overlapping key windows [k0 + i*block, k0 + i*block + span), i < n -> (B*n, span, Hkv, D),
    a strided view of x (no copy when B == 1)."""
    b = x.shape[0]
    w = x[:, k0:k0 + (n - 1) * block + span].unfold(1, span, block)  # (B, n, Hkv, D, span)
    return w.permute(0, 1, 4, 2, 3).reshape(b * n, span, *x.shape[2:])


def _band_args(spec, band: Band, device):
    # the pattern of the band's first block serves every block of the band
    return _tile_args(spec, band.problem, band.q0, band.q0 + band.block, band.q0 + band.rel_k0,
                      band.q0 + band.rel_k0 + band.span, "masked", device)


def _lse_rows(lse, b, n, block):
    """(B*n, H, block) -> (B, H, n*block)."""
    h = lse.shape[1]
    return lse.reshape(b, n, h, block).permute(0, 2, 1, 3).reshape(b, h, n * block)


def blockwise_forward(q, k, v, spec: AttentionSpec, problems, block_q: int, block_k: int, tiles, into=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D) in q's dtype, lse (B, H, Sq).
    Query rows outside every problem (none, in practice) are left 0 / -inf.

    into: optional running (out, lse) in the compute dtype over other keys; this call's keys are
    merged into it in place and it is returned (ring attention accumulates across ranks this way).
    """
    b, sq, h, _ = q.shape
    cd = kernels.compute_dtype(q.dtype)
    if into is not None:
        out, lse = into
    else:
        out = torch.zeros_like(q)
        lse = torch.full((b, h, sq), float("-inf"), dtype=cd, device=q.device)

    def store(q0, q1, o, l):
        if into is not None:
            o, l = merge_attention(out[:, q0:q1], lse[:, :, q0:q1], o, l)
        out[:, q0:q1] = o
        lse[:, :, q0:q1] = l
    max_run = k.shape[1] if tiles is kernels.cpu_flash else block_k
    for item in plan(spec, problems, block_q, block_k, max_run, bands=True):
        if isinstance(item, Band):
            args = _band_args(spec, item, q.device)
            for c0, n in _band_chunks(item, q, k):
                q0 = item.q0 + c0 * item.block
                o, l = tiles.tile_forward(_stack_queries(q, q0, n, item.block),
                                          _stack_windows(k, q0 + item.rel_k0, n, item.block, item.span),
                                          _stack_windows(v, q0 + item.rel_k0, n, item.block, item.span), **args)
                store(q0, q0 + n * item.block, o.reshape(b, n * item.block, *o.shape[2:]),
                      _lse_rows(l, b, n, item.block))
            continue
        acc_o = acc_l = None
        q0, q1 = item.q0, item.q1
        for seg in item.segments:
            o, l = tiles.tile_forward(q[:, q0:q1], k[:, seg.k0:seg.k1], v[:, seg.k0:seg.k1],
                                      **_tile_args(spec, item.problem, q0, q1, seg.k0, seg.k1, seg.kind, q.device))
            acc_o, acc_l = (o, l) if acc_o is None else merge_attention(acc_o, acc_l, o, l)
        if acc_o is not None:
            store(q0, q1, acc_o, acc_l)
    return out, lse


# The backward's temporaries (a query block's dq, a segment's dk/dv) scale with its tiles, so it
# re-plans with tiles of at most this edge whatever the forward used.
_BACKWARD_MAX_BLOCK = 1024


def _window_index(k0, n, block, span, device):
    """Absolute key index of every element of n stacked windows, flattened (n*span,)."""
    starts = k0 + torch.arange(n, device=device) * block
    return (starts.unsqueeze(1) + torch.arange(span, device=device)).reshape(-1)


def blockwise_backward(dout, q, k, v, out, lse, dlse, spec: AttentionSpec, problems, block_q: int, block_k: int,
                       tiles, into=None):
    """Gradients (dq, dk, dv) in the input dtypes; dlse (B, H, Sq) may be None.

    into: optional (dq, dk, dv) accumulators in the compute dtype; gradients are added to them in
    place and they are returned as they are (ring attention accumulates across ranks this way).
    """
    b = q.shape[0]
    cd = kernels.compute_dtype(q.dtype)
    if dlse is not None and tiles is kernels.cpu_flash:
        tiles = kernels.torch_tiles  # the fused backward derives delta itself and cannot add dlse
    if into is not None:
        dq, dk, dv = into
    else:
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)

    def delta_of(q0, q1):
        if tiles is kernels.cpu_flash:
            return None  # the fused tile derives delta from `out` itself
        d = (dout[:, q0:q1].to(cd) * out[:, q0:q1].to(cd)).sum(-1).transpose(1, 2)  # (B, H, tq)
        return d if dlse is None else d - dlse[:, :, q0:q1].to(cd)

    block_q, block_k = min(block_q, _BACKWARD_MAX_BLOCK), min(block_k, _BACKWARD_MAX_BLOCK)
    for item in plan(spec, problems, block_q, block_k, block_k, bands=True):
        if isinstance(item, Band):
            args = _band_args(spec, item, q.device)
            for c0, n in _band_chunks(item, q, k):
                q0, rows = item.q0 + c0 * item.block, n * item.block
                kw0 = q0 + item.rel_k0
                delta = delta_of(q0, q0 + rows)
                if delta is not None:  # (B, H, n*block) -> (B*n, H, block)
                    delta = delta.reshape(b, -1, n, item.block).permute(0, 2, 1, 3).reshape(b * n, -1, item.block)
                lse_g = lse[:, :, q0:q0 + rows].reshape(b, -1, n, item.block).permute(0, 2, 1, 3)
                gq, gk, gv = tiles.tile_backward(
                    _stack_queries(dout, q0, n, item.block), _stack_queries(q, q0, n, item.block),
                    _stack_windows(k, kw0, n, item.block, item.span), _stack_windows(v, kw0, n, item.block, item.span),
                    _stack_queries(out, q0, n, item.block), lse_g.reshape(b * n, -1, item.block), delta, **args)
                dq[:, q0:q0 + rows] += gq.reshape(b, rows, *gq.shape[2:])
                # overlapping windows: index_add_ sums every window's share into its keys
                idx = _window_index(kw0, n, item.block, item.span, q.device)
                dk.index_add_(1, idx, gk.to(cd).reshape(b, n * item.span, *gk.shape[2:]))
                dv.index_add_(1, idx, gv.to(cd).reshape(b, n * item.span, *gv.shape[2:]))
            continue
        if not item.segments:
            continue
        q0, q1 = item.q0, item.q1
        qt, dot, ot, lt = q[:, q0:q1], dout[:, q0:q1], out[:, q0:q1], lse[:, :, q0:q1]
        delta = delta_of(q0, q1)
        for seg in item.segments:
            gq, gk, gv = tiles.tile_backward(dot, qt, k[:, seg.k0:seg.k1], v[:, seg.k0:seg.k1], ot, lt, delta,
                                             **_tile_args(spec, item.problem, q0, q1, seg.k0, seg.k1, seg.kind,
                                                          q.device))
            dq[:, q0:q1] += gq
            dk[:, seg.k0:seg.k1] += gk
            dv[:, seg.k0:seg.k1] += gv
    if into is not None:
        return dq, dk, dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockwiseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec, problems, block_q, block_k, tiles):
        out, lse = blockwise_forward(q, k, v, spec, problems, block_q, block_k, tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (spec, problems, block_q, block_k, tiles)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = blockwise_backward(dout, q, k, v, out, lse, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def blockwise_attention(q, k, v, spec: AttentionSpec, block_q: int, block_k: int, impl: str | None = None,
                        problems=None):
    """Blockwise attention with O(S) memory, differentiable in q, k, v (and through lse).

    q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq) float32
    (float64 for float64 input). impl: tile implementation ("torch", "cpu_flash" or None = best).
    problems: list of Problem (packed sequences); default one problem covering everything.
    """
    tiles = kernels.select(q, softcap=spec.softcap, impl=impl)
    if problems is None:
        problems = (Problem(0, q.shape[1], 0, k.shape[1]),)
    return _BlockwiseFunction.apply(q, k, v, spec, tuple(problems), block_q, block_k, tiles)
