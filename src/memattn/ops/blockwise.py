"""Blockwise (flash) attention: a schedule of tiles with an online-softmax merge.

Forward: for each query block, attend to every key tile the mask does not rule out, merging
partial results by their log-sum-exp; keep only ``out`` and ``lse``. Backward
(FlashAttention-2): recompute each tile's probabilities from the saved ``lse`` with
``delta = rowsum(dO * O) - dlse`` and accumulate dq, dk, dv. No Sq x Sk tensor is ever
allocated: the largest temporary is one tile.

Tile kinds come from the mask's block layout (``memattn.masks``): EMPTY tiles are skipped,
FULL tiles run without a mask, PARTIAL tiles get an element mask (or, for an aligned causal
diagonal tile, the kernel's own causal flag). Runs of adjacent FULL tiles are handed to the
tile primitive as one call when it tiles internally (the fused CPU kernel), which keeps
Python overhead negligible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..masks import EMPTY, FULL, edges
from .merge import merge_attention
from .spec import AttentionSpec


@dataclass(frozen=True)
class Segment:
    """Keys [k0, k1) for one query block; kind is 'full', 'causal' (aligned diagonal) or 'masked'."""

    k0: int
    k1: int
    kind: str


def plan(spec: AttentionSpec, seqlen_q: int, seqlen_k: int, block_q: int, block_k: int,
         max_run: int) -> list[tuple[int, int, list[Segment]]]:
    """The tile schedule: [(q0, q1, [Segment, ...]), ...], EMPTY tiles left out.

    Adjacent FULL tiles are merged into segments of at most `max_run` keys.
    Cost: O((Sq / block_q) * (Sk / block_k)).
    """
    qe, ke = edges(seqlen_q, block_q), edges(seqlen_k, block_k, seqlen_k - seqlen_q)
    nq, nk = len(qe) - 1, len(ke) - 1
    if spec.mask is None:
        kinds = torch.full((nq, nk), FULL, dtype=torch.int8)
    else:
        kinds = spec.mask.block_kinds(seqlen_q, seqlen_k, qe, ke)
    qe_l, ke_l, kinds_l = qe.tolist(), ke.tolist(), kinds.tolist()
    out = []
    for a in range(nq):
        q0, q1 = qe_l[a], qe_l[a + 1]
        segs: list[Segment] = []
        for b in range(nk):
            kind = kinds_l[a][b]
            if kind == EMPTY:
                continue
            k0, k1 = ke_l[b], ke_l[b + 1]
            if kind == FULL:
                last = segs[-1] if segs else None
                if last is not None and last.kind == "full" and last.k1 == k0 and k1 - last.k0 <= max_run:
                    segs[-1] = Segment(last.k0, k1, "full")
                else:
                    segs.append(Segment(k0, k1, "full"))
            elif spec.mask.tile_is_causal_diagonal(seqlen_q, seqlen_k, q0, q1, k0, k1):
                segs.append(Segment(k0, k1, "causal"))
            else:
                segs.append(Segment(k0, k1, "masked"))
        out.append((q0, q1, segs))
    return out


def _tile_args(spec, sq, sk, q0, q1, seg, device):
    mask = spec.mask.element_mask(sq, sk, q0, q1, seg.k0, seg.k1, device) if seg.kind == "masked" else None
    bias = spec.tile_bias(sq, sk, q0, q1, seg.k0, seg.k1, device)
    return dict(scale=spec.scale, mask=mask, bias=bias, softcap=spec.softcap, causal=seg.kind == "causal")


def blockwise_forward(q, k, v, spec: AttentionSpec, block_q: int, block_k: int, tiles, into=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D) in q's dtype, lse (B, H, Sq).

    into: optional running (out, lse) in the compute dtype over other keys; this call's keys are
    merged into it in place and it is returned (ring attention accumulates across ranks this way).
    """
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    cd = kernels.compute_dtype(q.dtype)
    if into is not None:
        out, lse = into
    else:
        out = torch.empty_like(q)
        lse = torch.full((b, h, sq), float("-inf"), dtype=cd, device=q.device)
    max_run = sk if tiles is kernels.cpu_flash else block_k
    for q0, q1, segs in plan(spec, sq, sk, block_q, block_k, max_run):
        if not segs:
            if into is None:
                out[:, q0:q1] = 0
            continue
        acc_o, acc_l = (None, None) if into is None else (out[:, q0:q1], lse[:, :, q0:q1])
        qt = q[:, q0:q1]
        for seg in segs:
            o, l = tiles.tile_forward(qt, k[:, seg.k0:seg.k1], v[:, seg.k0:seg.k1],
                                      **_tile_args(spec, sq, sk, q0, q1, seg, q.device))
            acc_o, acc_l = (o, l) if acc_o is None else merge_attention(acc_o, acc_l, o, l)
        out[:, q0:q1] = acc_o
        lse[:, :, q0:q1] = acc_l
    return out, lse


# The fused backward returns dk/dv for a whole segment; capping segments keeps that temporary small.
_FUSED_BACKWARD_MAX_RUN = 2048


def blockwise_backward(dout, q, k, v, out, lse, dlse, spec: AttentionSpec, block_q: int, block_k: int, tiles,
                       into=None):
    """Gradients (dq, dk, dv) in the input dtypes; dlse (B, H, Sq) may be None.

    into: optional (dq, dk, dv) accumulators in the compute dtype; gradients are added to them in
    place and they are returned as they are (ring attention accumulates across ranks this way).
    """
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    cd = kernels.compute_dtype(q.dtype)
    if dlse is not None and tiles is kernels.cpu_flash:
        tiles = kernels.torch_tiles  # the fused backward derives delta itself and cannot add dlse
    if into is not None:
        dq, dk, dv = into
    else:
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)
    max_run = min(sk, _FUSED_BACKWARD_MAX_RUN) if tiles is kernels.cpu_flash else block_k
    for q0, q1, segs in plan(spec, sq, sk, block_q, block_k, max_run):
        if not segs:
            continue
        qt, dot, ot, lt = q[:, q0:q1], dout[:, q0:q1], out[:, q0:q1], lse[:, :, q0:q1]
        delta = (dot.to(cd) * ot.to(cd)).sum(-1).transpose(1, 2)  # (B, H, tq)
        if dlse is not None:
            delta = delta - dlse[:, :, q0:q1].to(cd)
        for seg in segs:
            gq, gk, gv = tiles.tile_backward(dot, qt, k[:, seg.k0:seg.k1], v[:, seg.k0:seg.k1], ot, lt, delta,
                                             **_tile_args(spec, sq, sk, q0, q1, seg, q.device))
            dq[:, q0:q1] += gq
            dk[:, seg.k0:seg.k1] += gk
            dv[:, seg.k0:seg.k1] += gv
    if into is not None:
        return dq, dk, dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockwiseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec, block_q, block_k, tiles):
        out, lse = blockwise_forward(q, k, v, spec, block_q, block_k, tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (spec, block_q, block_k, tiles)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = blockwise_backward(dout, q, k, v, out, lse, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def blockwise_attention(q, k, v, spec: AttentionSpec, block_q: int, block_k: int, impl: str | None = None):
    """Blockwise attention with O(S) memory, differentiable in q, k, v (and through lse).

    q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq) float32
    (float64 for float64 input). impl: tile implementation ("torch", "cpu_flash" or None = best).
    """
    tiles = kernels.select(q, softcap=spec.softcap, impl=impl)
    return _BlockwiseFunction.apply(q, k, v, spec, block_q, block_k, tiles)
