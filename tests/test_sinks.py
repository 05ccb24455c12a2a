"""Learnable attention sinks (gpt-oss): ``sinks=`` on every exact path (``memattn.attention``'s methods and
tile backends, ``attention_varlen``, ``paged_attention``) and its gradients, against the float64 oracle with
the sink materialised as one more score column (``memattn.reference``), FlashAttention's rule."""
from __future__ import annotations

import math

import pytest
import torch

import memattn
from memattn import kernels, reference
from memattn.masks import causal as causal_mask
from memattn.ops.merge import merge_sinks
from memattn.ops.paged import paged_attention, paged_attention_reference

from conftest import amax, assert_fa_rule, attention_floors, cotangents, fa_floor, grads, max_row_norm, rand_qkv

# (method, forced tile backend): the materialising methods, blockwise on each CPU tile, auto (fused CPU)
PATHS = [("standard", None), ("checkpoint", None), ("blockwise", "torch"), ("blockwise", "cpu_flash"),
         ("auto", None)]


def _sinks(h, dtype, seed):
    """Sink logits at the scale of the rows' lse (log Sk + a few), so the sink takes a real share."""
    g = torch.Generator().manual_seed(seed + 1)
    return (3.0 + 2.0 * torch.randn(h, generator=g, dtype=torch.float64)).to(dtype)


def _sink_floor(q, v, dout, dlse, rows):
    """d sink_h = sum over rows of p_sink (dlse - dO . O'): `rows` rows of a D-term product, each at most
    Mdlse + Ndo * Nv (O' is a sub-average of the values)."""
    return fa_floor(q.dtype, amax(dlse) + max_row_norm(dout) * max_row_norm(v), rows * q.shape[-1])


def _oracle(q, k, v, sinks, causal, kpm):
    mask = causal_mask().dense(q.shape[1], k.shape[1]) if causal else None
    if kpm is not None:
        mask = kpm[:, None, None, :] if mask is None else mask & kpm[:, None, None, :]
    return reference.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True)


def _check(b, sq, sk, h, hkv, d, dtype, seed, *, causal, kpm=None, sink_dtype=torch.float32):
    (q64, k64, v64), (q, k, v) = rand_qkv(b, sq, sk, h, hkv, d, dtype, seed)
    s64 = _sinks(h, torch.float64, seed).requires_grad_()
    s = s64.detach().to(sink_dtype).requires_grad_()
    s64 = s.detach().double().requires_grad_()  # the oracle sees exactly the path's logits
    ref = _oracle(q64, k64, v64, s64, causal, kpm)
    naive = _oracle(q, k, v, s, causal, kpm)
    ref_g = grads(list(ref), (q64, k64, v64, s64))
    nai_g = grads(list(naive), (q, k, v, s))
    dout, dlse = cotangents(list(naive))
    floor = attention_floors(q, k, v, dout, dlse)
    floor["dsinks"] = _sink_floor(q, v, dout, dlse, b * sq)
    failures = []
    for method, tile in PATHS:
        name = f"{method}/{tile}"
        try:
            with kernels.use_backend(tile):
                out, lse = memattn.attention(q, k, v, causal=causal, key_padding_mask=kpm, method=method,
                                             return_lse=True, sinks=s)
            assert out.dtype == dtype and not torch.isnan(out).any() and torch.isfinite(lse).all(), name
            assert_fa_rule(f"{name} out", out, ref[0], naive[0], floor=floor["out"], seed=seed)
            assert_fa_rule(f"{name} lse", lse, ref[1], naive[1], floor=floor["lse"], seed=seed)
            for gname, g, rg, ng in zip(("dq", "dk", "dv", "dsinks"), grads([out, lse], (q, k, v, s)), ref_g, nai_g):
                assert torch.isfinite(g).all(), f"{name}: {gname} not finite"
                assert_fa_rule(f"{name} {gname}", g, rg, ng, factor=3.0, floor=floor[gname], seed=seed)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("sq,sk,causal", [(1, 147, False), (113, 203, True), (217, 128, True)])
def test_every_method_float32(sq, sk, causal, seed):
    _check(2, sq, sk, 9, 3, 40, torch.float32, seed, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_with_input_dtype_sinks(dtype, seed):
    _check(2, 113, 203, 9, 3, 64, dtype, seed, causal=True, sink_dtype=dtype)


def test_fully_masked_rows_keep_zero_output_and_lse_is_the_sink(seed):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(3, 130, generator=g) > 0.3
    kpm[1] = False  # sequence 1 sees no key at all
    _check(3, 70, 130, 4, 2, 32, torch.float32, seed, causal=False, kpm=kpm)
    (q, k, v), _ = rand_qkv(3, 70, 130, 4, 2, 32, torch.float64, seed)
    s = _sinks(4, torch.float64, seed).requires_grad_()
    out, lse = memattn.attention(q, k, v, key_padding_mask=kpm, method="blockwise", return_lse=True, sinks=s)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(lse[1], s.detach().view(4, 1).expand(4, 70))
    dq, ds = grads([out, lse], (q, s))
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.isfinite(ds).all()


def test_sink_gradient_formula(seed):
    """d sink_h = sum over rows of p_sink * (dlse' - rowsum(dO * O')), p_sink = exp(sink - lse'): the
    closed form the merge's docstring states, against autograd through the float64 oracle."""
    (q, k, v), _ = rand_qkv(2, 9, 11, 3, 3, 8, torch.float64, seed)
    s = _sinks(3, torch.float64, seed).requires_grad_()
    out, lse = reference.attention(q, k, v, sinks=s, return_lse=True)
    dout, dlse = cotangents([out, lse])
    (auto,) = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), s)
    p_sink = torch.exp(s.detach().view(1, 3, 1) - lse.detach())  # (B, H, S)
    rowdot = (dout * out.detach()).sum(-1).transpose(1, 2)  # (B, H, S)
    closed = (p_sink * (dlse - rowdot)).sum((0, 2))
    assert (auto - closed).abs().max().item() < 1e-12


def test_varlen(seed):
    lens_q, lens_k = [5, 0, 40, 17], [9, 3, 40, 1]
    h, hkv, d = 6, 2, 32
    g = torch.Generator().manual_seed(seed)
    q64 = torch.randn(sum(lens_q), h, d, generator=g, dtype=torch.float64)
    k64 = torch.randn(sum(lens_k), hkv, d, generator=g, dtype=torch.float64)
    v64 = torch.randn(sum(lens_k), hkv, d, generator=g, dtype=torch.float64)
    s64 = _sinks(h, torch.float64, seed)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32)
    cq, ck = cu(lens_q), cu(lens_k)
    leaves = [t.float().requires_grad_() for t in (q64, k64, v64, s64)]
    out, lse = memattn.attention_varlen(*leaves[:3], cq, ck, max(lens_q), max(lens_k), causal=True,
                                        return_lse=True, sinks=leaves[3])
    ours_g = grads([out, lse], leaves)
    refs, naives = [], []
    for dt in (torch.float64, torch.float32):
        ls = [t.to(dt).requires_grad_() for t in (q64, k64, v64, s64)]
        outs, lses = [], []
        for i in range(len(lens_q)):  # sequence by sequence, each its own causal problem
            qi, ki, vi = (x[a:b].unsqueeze(0) for x, a, b in ((ls[0], cq[i], cq[i + 1]), (ls[1], ck[i], ck[i + 1]),
                                                               (ls[2], ck[i], ck[i + 1])))
            o, l = _oracle(qi, ki, vi, ls[3], True, None)
            outs.append(o[0])
            lses.append(l[0])
        o, l = torch.cat(outs), torch.cat(lses, dim=1)
        (refs if dt == torch.float64 else naives).append((o, l, grads([o, l], ls)))
    (ro, rl, rg), (no, nl, ng) = refs[0], naives[0]
    q, k, v = leaves[:3]
    dout, dlse = cotangents([no, nl])
    floor = attention_floors(q, k, v, dout, dlse, keys=max(lens_k), rows=max(lens_q) * h // hkv)
    floor["dsinks"] = _sink_floor(q, v, dout, dlse, sum(lens_q))
    assert_fa_rule("varlen out", out, ro, no, floor=floor["out"], seed=seed)
    assert_fa_rule("varlen lse", lse, rl, nl, floor=floor["lse"], seed=seed)
    for name, a, r, n in zip(("dq", "dk", "dv", "dsinks"), ours_g, rg, ng):
        assert_fa_rule(f"varlen {name}", a, r, n, factor=3.0, floor=floor[name], seed=seed)


@pytest.mark.parametrize("decode", ["native", "pool", "gather"])
def test_paged_decode_and_prefill(decode, seed):
    g = torch.Generator().manual_seed(seed)
    bs, h, hkv, d = 16, 8, 2, 64
    lens, q_lens = [40, 33, 70, 1, 5], [40, 1, 23, 1, 0]  # a fresh prompt, decodes, a chunk, an idle row
    nb = 32
    kc = torch.randn(nb, bs, hkv, d, generator=g, dtype=torch.float64)
    vc = torch.randn(nb, bs, hkv, d, generator=g, dtype=torch.float64)
    table = torch.randperm(nb, generator=g)[:len(lens) * 5].view(len(lens), 5).to(torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), h, d, generator=g, dtype=torch.float64)
    s = _sinks(h, torch.float64, seed)
    ref, ref_lse = paged_attention_reference(q, kc, vc, table, seqlens, cu_seqlens_q=cu, return_lse=True, sinks=s)
    args = [t.float() for t in (q, kc, vc)]
    naive, naive_lse = paged_attention_reference(*args, table, seqlens, cu_seqlens_q=cu, return_lse=True,
                                                 sinks=s.float())
    floor = attention_floors(*args, keys=max(lens))
    with kernels.use_backend(decode=decode):
        for name, cu_q, rows in (("mixed", cu, slice(None)), ("pure decode", None, None)):
            if cu_q is None:  # the decode rows alone, as an unpacked (B, 1, H, D) batch
                dec = [i for i, n in enumerate(q_lens) if n == 1]
                starts = cu[:-1].tolist()
                qd = args[0][[starts[i] for i in dec]].unsqueeze(1)
                out, lse = paged_attention(qd, *args[1:], table[dec], seqlens[dec], return_lse=True, sinks=s.float())
                out, lse = out[:, 0], lse[:, :, 0].T
                idx = [starts[i] for i in dec]
                r, rl, n, nl = ref[idx], ref_lse[:, idx], naive[idx], naive_lse[:, idx]
            else:
                out, lse = paged_attention(*args, table, seqlens, cu_seqlens_q=cu, return_lse=True, sinks=s.float())
                r, rl, n, nl = ref, ref_lse, naive, naive_lse
            assert_fa_rule(f"{decode} {name} out", out, r, n, floor=floor["out"], seed=seed)
            assert_fa_rule(f"{decode} {name} lse", lse, rl, nl, floor=floor["lse"], seed=seed)


def test_merge_sinks_is_merge_with_a_valueless_partial(seed):
    """The sink as a partial result (out 0, lse = sink) merged by ``merge_attention`` gives the same."""
    (q, k, v), _ = rand_qkv(2, 7, 13, 3, 3, 8, torch.float64, seed, requires_grad=False)
    out, lse = memattn.attention(q, k, v, return_lse=True, method="standard")
    s = _sinks(3, torch.float64, seed)
    a = merge_sinks(out, lse, s)
    b = memattn.merge_attention(out, lse, torch.zeros_like(out), s.view(1, 3, 1).expand_as(lse))
    assert all((x - y).abs().max().item() < 1e-14 for x, y in zip(a, b))
    assert math.isclose(a[1][0, 0, 0].item(), math.log(math.exp(lse[0, 0, 0].item()) + math.exp(s[0].item())),
                        rel_tol=1e-12)


@pytest.mark.parametrize("bad,exc,match", [
    (torch.zeros(5), ValueError, r"\(heads,\) = \(4,\)"),
    (torch.zeros(4, dtype=torch.int64), TypeError, "float32"),
    ([0.0] * 4, TypeError, "tensor"),
])
def test_bad_sinks(bad, exc, match):
    (q, k, v), _ = rand_qkv(1, 3, 5, 4, 2, 8, torch.float64, 0, requires_grad=False)
    with pytest.raises(exc, match=match):
        memattn.attention(q, k, v, sinks=bad)
    with pytest.raises(exc, match=match):
        paged_attention(q, k.view(5, 1, 2, 8), v.view(5, 1, 2, 8), torch.arange(5, dtype=torch.int32).view(1, 5),
                        torch.tensor([5], dtype=torch.int32), sinks=bad)
