"""The tile schedule: which (query block, key range) pairs run, and with what mask and bias.

A call holds one or more *problems* (packed variable-length sequences): each is a query range and
a key range with its own bottom-right alignment; masks and biases are evaluated in the problem's
local coordinates. ``plan`` lists, per query block, the key *segments* the mask's block layout
does not rule out (``memattn.masks``): EMPTY tiles are skipped, FULL tiles run without a mask
(adjacent ones merged into one segment), PARTIAL tiles get an element mask or, for an aligned
causal diagonal tile, the kernel's own causal flag. With ``bands=True``, consecutive query blocks
whose visible keys have the same relative span (sliding windows: the mask and bias depend on
i - j alone) become one ``Band``, computed in one call: query blocks stacked on the batch axis,
their key windows overlapping strided views of k and v (no copy), one relative mask for all.

``forward`` runs a plan over a ``KeySource``: ``SliceKeys`` (contiguous k / v: dense, varlen,
ring) or any source that fetches a key range, such as a gather through a paged block table.
Blockwise attention (``ops/blockwise.py``), paged prefill and ring attention share it.
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


def tile_args(spec, prob: Problem, q0, q1, k0, k1, kind, device):
    """Keyword arguments of the tile primitive for queries [q0, q1) and keys [k0, k1) (absolute) of
    `prob`, a segment of `kind`: scale, element mask (masked tiles only), ALiBi bias, softcap, causal."""
    sq, sk, lq0, lq1, lk0, lk1 = _local(prob, q0, q1, k0, k1)
    mask = spec.mask.element_mask(sq, sk, lq0, lq1, lk0, lk1, device) if kind == "masked" else None
    bias = spec.tile_bias(sq, sk, lq0, lq1, lk0, lk1, device, sequence=prob.index)
    return dict(scale=spec.scale, mask=mask, bias=bias, softcap=spec.softcap, causal=kind == "causal")


# Bands are computed in chunks of query blocks so that stacked key windows (and the torch tile's
# scores) stay within this many bytes.
_BAND_CHUNK_BYTES = 32 * 2**20


def band_chunks(band: Band, q, k):
    b, h, d = q.shape[0], q.shape[2], q.shape[3]
    per_block = b * band.span * (2 * k.shape[2] * d + h * band.block) * 4
    step = max(1, _BAND_CHUNK_BYTES // max(1, per_block))  # per_block 0: an empty batch
    for c0 in range(0, band.count, step):
        yield c0, min(step, band.count - c0)


def stack_queries(x, q0, n, block):
    """(B, S, H, D) rows [q0, q0 + n*block) -> (B*n, block, H, D)."""
    b = x.shape[0]
    return x[:, q0:q0 + n * block].reshape(b * n, block, *x.shape[2:])


def stack_windows(x, k0, n, block, span):
    """Overlapping key windows [k0 + i*block, k0 + i*block + span), i < n -> (B*n, span, Hkv, D),
    a strided view of x (no copy when B == 1)."""
    b = x.shape[0]
    w = x[:, k0:k0 + (n - 1) * block + span].unfold(1, span, block)  # (B, n, Hkv, D, span)
    return w.permute(0, 1, 4, 2, 3).reshape(b * n, span, *x.shape[2:])


def band_args(spec, band: Band, device):
    """``tile_args`` of a band: one relative pattern for all its query blocks."""
    # the pattern of the band's first block serves every block of the band
    return tile_args(spec, band.problem, band.q0, band.q0 + band.block, band.q0 + band.rel_k0,
                      band.q0 + band.rel_k0 + band.span, "masked", device)


def lse_rows(lse, b, n, block):
    """(B*n, H, block) -> (B, H, n*block)."""
    h = lse.shape[1]
    return lse.reshape(b, n, h, block).permute(0, 2, 1, 3).reshape(b, h, n * block)


def window_index(k0, n, block, span, device):
    """Absolute key index of every element of n stacked windows, flattened (n*span,)."""
    starts = k0 + torch.arange(n, device=device) * block
    return (starts.unsqueeze(1) + torch.arange(span, device=device)).reshape(-1)


class SliceKeys:
    """Keys and values held contiguously: k, v (B, Sk, Hkv, D). Bands read overlapping windows of them."""

    supports_bands = True

    def __init__(self, k, v):
        self.k, self.v = k, v

    def __call__(self, k0: int, k1: int):
        """Keys [k0, k1): (B, k1 - k0, Hkv, D) views of k and v."""
        return self.k[:, k0:k1], self.v[:, k0:k1]

    def windows(self, k0: int, n: int, block: int, span: int):
        """n overlapping windows of `span` keys, `block` apart from k0: (B*n, span, Hkv, D) each."""
        return stack_windows(self.k, k0, n, block, span), stack_windows(self.v, k0, n, block, span)


def forward(q, keys, spec, problems, block_q: int, block_k: int, tiles, *, max_run: int, into=None):
    """Run the plan over `keys` (a ``KeySource``: called with (k0, k1) it returns that key range's
    (k, v) as (B, k1 - k0, Hkv, D); bands are used when it has ``supports_bands``).

    q (B, Sq, H, D) -> out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) in the compute dtype. Query
    rows outside every problem are left 0 / -inf. max_run: keys per merged run of FULL tiles.
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
    bands = getattr(keys, "supports_bands", False)
    for item in plan(spec, problems, block_q, block_k, max_run, bands=bands):
        if isinstance(item, Band):
            args = band_args(spec, item, q.device)
            for c0, n in band_chunks(item, q, keys.k):
                q0 = item.q0 + c0 * item.block
                kw, vw = keys.windows(q0 + item.rel_k0, n, item.block, item.span)
                o, l = tiles.tile_forward(stack_queries(q, q0, n, item.block), kw, vw, **args)
                store(q0, q0 + n * item.block, o.reshape(b, n * item.block, *o.shape[2:]),
                      lse_rows(l, b, n, item.block))
            continue
        acc_o = acc_l = None
        q0, q1 = item.q0, item.q1
        for seg in item.segments:
            kt, vt = keys(seg.k0, seg.k1)
            o, l = tiles.tile_forward(q[:, q0:q1], kt, vt,
                                      **tile_args(spec, item.problem, q0, q1, seg.k0, seg.k1, seg.kind, q.device))
            acc_o, acc_l = (o, l) if acc_o is None else merge_attention(acc_o, acc_l, o, l)
        if acc_o is not None:
            store(q0, q1, acc_o, acc_l)
    return out, lse


__all__ = ["Problem", "Segment", "QueryBlock", "Band", "plan", "tile_args", "band_args", "band_chunks",
           "stack_queries", "stack_windows", "lse_rows", "window_index", "SliceKeys", "forward"]
