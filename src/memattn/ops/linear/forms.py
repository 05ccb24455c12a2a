"""The forms of (unnormalised) linear attention over features, one signature for all.

Every form computes, for queries fq (N, Sq, Dk), keys fk (N, Sk, Dk), values v (N, Sk, Dv)
and an initial state s0 (N, Dk, Dv) (N = batch * heads, all in the compute dtype):

    y_i = fq_i^T (s0 + sum_{j visible from i} fk_j v_j^T)        s_final = s0 + sum_j fk_j v_j^T

where "visible" is j <= i (causal, Sq == Sk) or every j. The caller gets the normaliser for
free by appending a column of ones to v: that column of y is fq_i . z_i and of s is z.

- ``naive``: the quadratic form with an explicit causal mask, the oracle;
- ``recurrent``: token by token, the decode recurrence;
- ``chunked``: intra-chunk quadratic + inter-chunk states, O(S (C + Dk) Dv) matmul work,
  with a backward that recomputes chunk states (saved: only fq, fk, v, s0);
- ``noncausal``: one state over the whole sequence, O(S Dk Dv).
"""
from __future__ import annotations

import torch

# Chunks processed together: their states are materialised at once (GROUP * Dk * Dv per
# sequence-head), which turns the inter-chunk scan into a few batched matmuls and a short
# cumsum while keeping the temporary independent of S.
GROUP_CHUNKS = 32


def naive(fq, fk, v, s0, causal: bool):
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a.tril()
    return a @ v + fq @ s0, s0 + fk.transpose(-1, -2) @ v


def noncausal(fq, fk, v, s0):
    s = s0 + fk.transpose(-1, -2) @ v
    return fq @ s, s


def recurrent(fq, fk, v, s0):
    s = s0
    ys = []
    for t in range(fq.shape[1]):
        s = s + fk[:, t, :, None] * v[:, t, None, :]
        ys.append((fq[:, t, None, :] @ s).squeeze(1))
    y = torch.stack(ys, dim=1) if ys else fq.new_zeros(fq.shape[0], 0, v.shape[-1])
    return y, s


def _chunk_scan(q, k, v, s0, reverse: bool):
    """Inclusive causal (reverse=False) or anti-causal (reverse=True) linear attention, no autograd.

    Chunk-major: q (nc, N, C, Dk), k (nc, N, C, Dk), v (nc, N, C, Dv), s0 (N, Dk, Dv), all
    contiguous -> y (nc, N, C, Dv), s_final (N, Dk, Dv). Chunk-major keeps every group a
    contiguous block, so the batched matmuls below read it in place.
    Anti-causal: y_i = q_i^T (s0 + sum_{j >= i} k_j v_j^T), the backward's shape of sum.
    """
    nc, n, c, _ = q.shape
    dv = v.shape[-1]
    keep = torch.ones(c, c, dtype=torch.bool, device=q.device)
    drop = ~(keep.triu() if reverse else keep.tril())
    y = torch.empty(nc, n, c, dv, dtype=q.dtype, device=q.device)
    state = s0
    starts = range(0, nc, GROUP_CHUNKS)
    for g0 in (reversed(starts) if reverse else starts):
        g1 = min(nc, g0 + GROUP_CHUNKS)
        qg, kg, vg, yg = q[g0:g1], k[g0:g1], v[g0:g1], y[g0:g1]
        kv = kg.transpose(-1, -2) @ vg                 # (G, N, Dk, Dv): each chunk's sum
        run = kv.cumsum(0)                             # inclusive, from the group's start
        total = run[-1].clone()
        # State entering each chunk in scan order: causal state + run - kv, anti-causal state + total - run.
        before = run.sub_(kv).add_(state) if not reverse else run.neg_().add_(state + total)
        torch.matmul(qg, before, out=yg)
        a = (qg @ kg.transpose(-1, -2)).masked_fill_(drop, 0)
        yg.view(-1, c, dv).baddbmm_(a.view(-1, c, c), vg.view(-1, c, dv))
        state = state + total
    return y, state


def _to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N, S, D) -> (nc, N, C, D) contiguous, zero-padded to a whole chunk (zeros add nothing to states)."""
    n, s, d = x.shape
    pad = (-s) % chunk
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(n, (s + pad) // chunk, chunk, d).transpose(0, 1).contiguous()


def _from_chunks(y: torch.Tensor, s: int) -> torch.Tensor:
    nc, n, c, d = y.shape
    return y.transpose(0, 1).reshape(n, nc * c, d)[:, :s]


class _ChunkedCausal(torch.autograd.Function):
    """Chunked causal form on chunk-major tensors. Backward = three scans of the forward's kind,
    recomputing chunk states instead of storing them:

        dfq = scan(dy, v, fk, s0^T)                      causal
        dv, ds0 = scan(fk, fq, dy, ds_final)             anti-causal (its final state is ds0)
        dfk = scan(v, dy, fq, ds_final^T)                anti-causal
    """

    @staticmethod
    def forward(ctx, fq, fk, v, s0):
        y, s_final = _chunk_scan(fq, fk, v, s0, reverse=False)
        ctx.save_for_backward(fq, fk, v, s0)
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        fq, fk, v, s0 = ctx.saved_tensors
        ds_final = torch.zeros_like(s0) if ds_final is None else ds_final.contiguous()
        dy = torch.zeros_like(v) if dy is None else dy.contiguous()
        dfq = _chunk_scan(dy, v, fk, s0.transpose(-1, -2), reverse=False)[0]
        dv, ds0 = _chunk_scan(fk, fq, dy, ds_final, reverse=True)
        dfk = _chunk_scan(v, dy, fq, ds_final.transpose(-1, -2), reverse=True)[0]
        return dfq, dfk, dv, ds0


def chunked(fq, fk, v, s0, chunk: int):
    y, s = _ChunkedCausal.apply(_to_chunks(fq, chunk), _to_chunks(fk, chunk), _to_chunks(v, chunk),
                                s0.contiguous())
    return _from_chunks(y, fq.shape[1]), s
