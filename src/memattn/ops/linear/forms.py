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


def _chunk_scan(q, k, v, s0, chunk: int, reverse: bool):
    """Inclusive causal (reverse=False) or anti-causal (reverse=True) linear attention, no autograd.

    q (N, S, Dk), k (N, S, Dk), v (N, S, Dv), s0 (N, Dk, Dv) -> y (N, S, Dv), s_final.
    Anti-causal: y_i = q_i^T (s0 + sum_{j >= i} k_j v_j^T), the backward's shape of sum.
    """
    n, s, dk = q.shape
    dv = v.shape[-1]
    pad = (-s) % chunk
    if pad:  # zero keys and values add nothing to any state; padded rows are dropped
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nc = (s + pad) // chunk
    q, k, v = (t.reshape(n, nc, chunk, t.shape[-1]) for t in (q, k, v))
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device)
    keep = keep.triu() if reverse else keep.tril()
    y = torch.empty(n, nc, chunk, dv, dtype=q.dtype, device=q.device)
    state = s0
    starts = range(0, nc, GROUP_CHUNKS)
    for g0 in (reversed(starts) if reverse else starts):
        g1 = min(nc, g0 + GROUP_CHUNKS)
        qg, kg, vg = q[:, g0:g1], k[:, g0:g1], v[:, g0:g1]
        kv = kg.transpose(-1, -2) @ vg                                    # (N, G, Dk, Dv)
        run = (kv.flip(1).cumsum(1).flip(1) if reverse else kv.cumsum(1))  # inclusive, per chunk
        before = state.unsqueeze(1) + (run - kv)                          # state entering each chunk
        a = (qg @ kg.transpose(-1, -2)).masked_fill_(~keep, 0)
        y[:, g0:g1] = qg @ before + a @ vg
        state = state + run[:, 0 if reverse else -1]
    return y.reshape(n, nc * chunk, dv)[:, :s], state


class _ChunkedCausal(torch.autograd.Function):
    """Chunked causal form. Backward = three scans of the forward's kind (no stored states):

        dfq = scan(dy, v, fk, s0^T)                      causal
        dv, ds0 = scan(fk, fq, dy, ds_final)             anti-causal (its final state is ds0)
        dfk = scan(v, dy, fq, ds_final^T)                anti-causal
    """

    @staticmethod
    def forward(ctx, fq, fk, v, s0, chunk):
        y, s_final = _chunk_scan(fq, fk, v, s0, chunk, reverse=False)
        ctx.save_for_backward(fq, fk, v, s0)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return y, s_final

    @staticmethod
    def backward(ctx, dy, ds_final):
        fq, fk, v, s0 = ctx.saved_tensors
        c = ctx.chunk
        if ds_final is None:
            ds_final = torch.zeros_like(s0)
        if dy is None:
            dy = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        dfq = _chunk_scan(dy, v, fk, s0.transpose(-1, -2), c, reverse=False)[0]
        dv, ds0 = _chunk_scan(fk, fq, dy, ds_final, c, reverse=True)
        dfk = _chunk_scan(v, dy, fq, ds_final.transpose(-1, -2), c, reverse=True)[0]
        return dfq, dfk, dv, ds0, None


def chunked(fq, fk, v, s0, chunk: int):
    return _ChunkedCausal.apply(fq.contiguous(), fk.contiguous(), v.contiguous(), s0.contiguous(), chunk)
