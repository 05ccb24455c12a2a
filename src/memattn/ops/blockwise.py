"""Blockwise (flash) attention: the tile schedule (``ops/schedule.py``) with an online-softmax merge.

Forward: for each query block, attend to every key tile the mask does not rule out, merging
partial results by their log-sum-exp; keep only ``out`` and ``lse``. Backward
(FlashAttention-2): recompute each tile's probabilities from the saved ``lse`` with
``delta = rowsum(dO * O) - dlse`` and accumulate dq, dk, dv. No Sq x Sk tensor is ever
allocated: the largest temporary is bounded by the tiles.

Two ways keep Python overhead small (both planned in ``schedule``): runs of adjacent FULL tiles go
to the tile primitive as one call (however long for a backend with ``large_tiles``: the fused CPU
kernel tiles internally, so this stays O(S) memory), and sliding windows run as *bands*.

The tile backend is a ``memattn.kernels.Backend`` record; nothing here asks which one it is, only
what it can do (``large_tiles``, ``dlse``, ``derives_delta``).
"""
from __future__ import annotations

import torch

from .. import kernels
from .schedule import (Band, Problem, SliceKeys, band_args, band_chunks, forward, plan, stack_queries,
                       stack_windows, tile_args, window_index)
from .spec import AttentionSpec


def blockwise_forward(q, k, v, spec: AttentionSpec, problems, block_q: int, block_k: int, backend, into=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D) in q's dtype, lse (B, H, Sq).
    Query rows outside every problem (none, in practice) are left 0 / -inf. backend: a ``kernels.Backend``.

    into: optional running (out, lse) in the compute dtype over other keys; this call's keys are
    merged into it in place and it is returned (ring attention accumulates across ranks this way).
    """
    max_run = k.shape[1] if backend.large_tiles else block_k
    return forward(q, SliceKeys(k, v), spec, problems, block_q, block_k, backend.tiles, max_run=max_run, into=into)


# The backward's temporaries (a query block's dq, a segment's dk/dv) scale with its tiles, so it
# re-plans with tiles of at most this edge whatever the forward used.
_BACKWARD_MAX_BLOCK = 1024


def blockwise_backward(dout, q, k, v, out, lse, dlse, spec: AttentionSpec, problems, block_q: int, block_k: int,
                       backend, into=None):
    """Gradients (dq, dk, dv) in the input dtypes; dlse (B, H, Sq) may be None. backend: a ``kernels.Backend``
    (one whose backward cannot take dlse hands the call to the first that can).

    into: optional (dq, dk, dv) accumulators in the compute dtype; gradients are added to them in
    place and they are returned as they are (ring attention accumulates across ranks this way).
    """
    b = q.shape[0]
    cd = kernels.compute_dtype(q.dtype)
    if dlse is not None and not backend.dlse:
        backend = kernels.choose(q, softcap=spec.softcap, dlse=True, honour_forced=False)
    tiles = backend.tiles
    if into is not None:
        dq, dk, dv = into
    else:
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)

    def delta_of(q0, q1):
        if backend.derives_delta:
            return None  # the fused tile derives delta from `out` itself
        d = (dout[:, q0:q1].to(cd) * out[:, q0:q1].to(cd)).sum(-1).transpose(1, 2)  # (B, H, tq)
        return d if dlse is None else d - dlse[:, :, q0:q1].to(cd)

    block_q, block_k = min(block_q, _BACKWARD_MAX_BLOCK), min(block_k, _BACKWARD_MAX_BLOCK)
    for item in (plan(spec, problems, block_q, block_k, block_k, bands=True) if b else ()):  # batch 0: no tile
        if isinstance(item, Band):
            args = band_args(spec, item, q.device)
            for c0, n in band_chunks(item, q, k):
                q0, rows = item.q0 + c0 * item.block, n * item.block
                kw0 = q0 + item.rel_k0
                delta = delta_of(q0, q0 + rows)
                if delta is not None:  # (B, H, n*block) -> (B*n, H, block)
                    delta = delta.reshape(b, -1, n, item.block).permute(0, 2, 1, 3).reshape(b * n, -1, item.block)
                lse_g = lse[:, :, q0:q0 + rows].reshape(b, -1, n, item.block).permute(0, 2, 1, 3)
                gq, gk, gv = tiles.tile_backward(
                    stack_queries(dout, q0, n, item.block), stack_queries(q, q0, n, item.block),
                    stack_windows(k, kw0, n, item.block, item.span), stack_windows(v, kw0, n, item.block, item.span),
                    stack_queries(out, q0, n, item.block), lse_g.reshape(b * n, -1, item.block), delta, **args)
                dq[:, q0:q0 + rows] += gq.reshape(b, rows, *gq.shape[2:])
                # overlapping windows: index_add_ sums every window's share into its keys
                idx = window_index(kw0, n, item.block, item.span, q.device)
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
                                             **tile_args(spec, item.problem, q0, q1, seg.k0, seg.k1, seg.kind,
                                                          q.device))
            dq[:, q0:q1] += gq
            dk[:, seg.k0:seg.k1] += gk
            dv[:, seg.k0:seg.k1] += gv
    if into is not None:
        return dq, dk, dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashFunction(torch.autograd.Function):
    """Autograd for any schedule that keeps only (out, lse) in forward and recomputes in backward.

    ``FlashFunction.apply(q, k, v, forward, backward)`` with forward(q, k, v) -> (out, lse) and
    backward(dout, q, k, v, out, lse, dlse) -> (dq, dk, dv); dout or dlse may be None (a zero dout
    is materialised, a missing dlse stays None). out is returned in q's dtype. Blockwise and ring
    attention share it."""

    @staticmethod
    def forward(ctx, q, k, v, forward, backward):
        out, lse = forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backward_fn = backward
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros(out.shape, dtype=q.dtype, device=q.device)
        dq, dk, dv = ctx.backward_fn(dout, q, k, v, out, lse, dlse)
        return dq, dk, dv, None, None


def blockwise_attention(q, k, v, spec: AttentionSpec, block_q: int, block_k: int, impl=None,
                        problems=None):
    """Blockwise attention with O(S) memory, differentiable in q, k, v (and through lse).

    q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq) float32
    (float64 for float64 input). impl: a tile backend name ("torch", "cpu_flash", "triton") or record
    (``kernels.Backend``); None: the ``use_backend`` choice or the best that fits. problems: list of ``schedule.Problem`` (packed
    sequences); default one problem covering everything.
    """
    backend = impl if isinstance(impl, kernels.Backend) else kernels.choose(q, softcap=spec.softcap, impl=impl)
    if problems is None:
        problems = (Problem(0, q.shape[1], 0, k.shape[1]),)
    args = (spec, tuple(problems), block_q, block_k, backend)
    return FlashFunction.apply(q, k, v, lambda q_, k_, v_: blockwise_forward(q_, k_, v_, *args),
                               lambda *grads_in: blockwise_backward(*grads_in, *args))
