"""Structured sparsity: mask objects, their block layouts, ALiBi/softcap, dense masks and varlen,
all through the blockwise schedule, against the float64 oracle with the equivalent dense mask/bias."""
from __future__ import annotations

import pytest
import torch

import memattn
from memattn import kernels, masks, reference
from memattn.masks import EMPTY, FULL, PARTIAL, edges
from memattn.memory import measure
from memattn.ops.blockwise import blockwise_attention
from memattn.ops.spec import build_spec

from conftest import amax, assert_fa_rule, attention_floors, cotangents, grads, rand_qkv

MASKS = {
    "causal": lambda sq, sk: masks.causal(),
    "window": lambda sq, sk: masks.sliding_window(37, 5),
    "window-causal": lambda sq, sk: masks.sliding_window(50, 0),
    "global|window": lambda sq, sk: masks.global_tokens([0, 3, 77, sk - 1]) | masks.sliding_window(20, 20),
    "bigbird": lambda sq, sk: masks.bigbird(24, 3, 1, 2, seed=5),
    "strided": lambda sq, sk: masks.strided(17),
    "fixed": lambda sq, sk: masks.fixed(32, 4),
    "document&causal": lambda sq, sk: masks.document([40, 1, 0, 90, sq - 131]) & masks.causal(),
    "mask_mod": lambda sq, sk: masks.from_mask_mod(lambda b, h, i, j: (i + j) % 3 != 0, sq, sk, block_size=32),
    "causal&window|global": lambda sq, sk: (masks.causal() & masks.sliding_window(30, 0)) | masks.global_tokens([2]),
}
SQUARE_ONLY = {"document&causal", "mask_mod"}


def check_paths(spec_kwargs, q64, k64, v64, q, k, v, mask_dense, bias_dense, blocks=((29, 41),), impls=("torch", "cpu_flash"),
                softcap=0.0, seed=None):
    spec = build_spec(q.shape, k.shape[1], **spec_kwargs)
    ref_o, ref_l = reference.attention(q64, k64, v64, mask=mask_dense, bias=bias_dense, softcap=softcap,
                                       softmax_scale=spec.scale, return_lse=True)
    nai_o, nai_l = reference.attention(q, k, v, mask=mask_dense, bias=bias_dense, softcap=softcap,
                                       softmax_scale=spec.scale, return_lse=True)
    ref_g, nai_g = grads([ref_o, ref_l], (q64, k64, v64)), grads([nai_o, nai_l], (q, k, v))
    floor = attention_floors(q, k, v, *cotangents([nai_o, nai_l]), scale=spec.scale, bias=bias_dense)
    for bq, bk in blocks:
        for impl in impls:
            if softcap and not kernels.backend(impl).softcap:
                continue
            out, lse = blockwise_attention(q, k, v, spec, bq, bk, impl)
            tag = f"{impl} blocks {bq}x{bk}"
            assert not torch.isnan(out).any(), tag
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_l)), f"{tag}: empty rows differ"
            assert_fa_rule(f"{tag} out", out, ref_o, nai_o, floor=floor["out"], seed=seed)
            assert_fa_rule(f"{tag} lse", lse, ref_l, nai_l, floor=floor["lse"], seed=seed)
            for name, g, rg, ng in zip("qkv", grads([out, lse], (q, k, v)), ref_g, nai_g):
                assert torch.isfinite(g).all(), f"{tag} d{name}"
                assert_fa_rule(f"{tag} d{name}", g, rg, ng, factor=3.0, floor=floor[f"d{name}"], seed=seed)


# document and mask_mod masks are built for Sq == Sk only (they reject other shapes: test_bad_masks_and_arguments)
MASK_CASES = [(name, sq, sk) for name in MASKS for sq, sk in ((203, 203), (113, 203), (203, 150))
              if name not in SQUARE_ONLY or sq == sk]


@pytest.mark.parametrize("name,sq,sk", MASK_CASES)
def test_mask_objects_against_dense_oracle(name, sq, sk, seed):
    (q64, k64, v64), (q, k, v) = rand_qkv(2, sq, sk, 6, 2, 24, torch.float32, seed)
    m = MASKS[name](sq, sk)
    dense = m.dense(sq, sk)
    check_paths(dict(causal=False, softmax_scale=None, key_padding_mask=None, mask=m), q64, k64, v64, q, k, v,
                dense, None, blocks=((29, 41), (32, 32)), seed=seed)


@pytest.mark.parametrize("name", list(MASKS))
def test_block_layout_is_sound_and_tight(name):
    sq = sk = 203
    m = MASKS[name](sq, sk)
    dense = m.dense(sq, sk).expand(1, 1, sq, sk)[0, 0] if m.dense(sq, sk).shape[0] == 1 else m.dense(sq, sk).all(0)[0]
    for bq, bk in ((29, 41), (32, 32), (64, 17)):
        qe, ke = edges(sq, bq), edges(sk, bk)
        kinds = m.block_kinds(sq, sk, qe, ke)
        assert kinds.shape == (len(qe) - 1, len(ke) - 1)
        for a in range(len(qe) - 1):
            for b in range(len(ke) - 1):
                tile = dense[qe[a]:qe[a + 1], ke[b]:ke[b + 1]]
                kind = int(kinds[a, b])
                if kind == FULL:
                    assert tile.all(), f"{name}: tile {a},{b} claimed FULL"
                elif kind == EMPTY:
                    assert not tile.any(), f"{name}: tile {a},{b} claimed EMPTY"
                elif name not in ("strided", "fixed"):
                    # exact layouts: a PARTIAL tile really is mixed (the Sparse Transformer
                    # patterns may call a tile PARTIAL conservatively)
                    assert tile.any() and not tile.all(), f"{name}: tile {a},{b} claimed PARTIAL"


def test_empty_tiles_are_skipped_by_the_schedule():
    from memattn.ops.schedule import Problem, plan
    q = torch.zeros(1, 1000, 1, 8)
    spec = build_spec(q.shape, q.shape[1], causal=True, softmax_scale=None, key_padding_mask=None, window_size=(99, 0))
    items = plan(spec, [Problem(0, 1000, 0, 1000)], 50, 50, 50)
    keys_per_block = [sum(s.k1 - s.k0 for s in it.segments) for it in items]
    assert max(keys_per_block) <= 150  # window 100 + a 50-row block: never the whole row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combination_causal_window_alibi_softcap_gqa_padding(dtype, seed):
    sq, sk, h, hkv = 150, 203, 9, 3
    (q64, k64, v64), (q, k, v) = rand_qkv(3, sq, sk, h, hkv, 40, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(3, sk, generator=g) > 0.3
    kpm[2, 100:] = False  # with the window, late rows of sequence 2 see no key
    slopes = torch.rand(3, h, generator=g) * 0.5
    for softcap in (0.0, 7.5):
        kw = dict(causal=True, softmax_scale=0.3, key_padding_mask=kpm, window_size=(40, -1), alibi_slopes=slopes,
                  softcap=softcap)
        spec = build_spec(q.shape, k.shape[1], **kw)
        dense = spec.mask.dense(sq, sk)
        bias = spec.dense_bias(sq, sk)
        ref_o, ref_l = reference.attention(q64, k64, v64, mask=dense, bias=bias, softcap=softcap, softmax_scale=0.3,
                                           return_lse=True)
        nai_o = reference.attention(q, k, v, mask=dense, bias=bias, softcap=softcap, softmax_scale=0.3)
        floor = attention_floors(q, k, v, scale=0.3, bias=bias)
        for method in ("blockwise", "auto", "standard", "checkpoint"):
            out, lse = memattn.attention(q, k, v, method=method, return_lse=True, **kw)
            assert not torch.isnan(out).any()
            assert_fa_rule(f"{method} softcap={softcap}", out, ref_o, nai_o, floor=floor["out"], seed=seed)
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_l))
        check_paths(kw, q64, k64, v64, q, k, v, dense, bias, blocks=((31, 31),), softcap=softcap, seed=seed)


def test_dense_bool_mask_argument(seed):
    (q64, k64, v64), (q, k, v) = rand_qkv(2, 120, 130, 4, 4, 16, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(2, 1, 120, 130, generator=g) > 0.7
    dense[:, :, :, 60:100] = False
    dense[1, :, 5] = False  # a fully masked row
    check_paths(dict(causal=False, softmax_scale=None, key_padding_mask=None, mask=dense), q64, k64, v64, q, k, v,
                dense, None, blocks=((32, 20),), seed=seed)
    out = memattn.attention(q, k, v, mask=dense & masks.causal().dense(120, 130), method="blockwise")
    ref = memattn.attention(q64, k64, v64, mask=dense, causal=True, method="standard")
    # no naive run here: the whole forward error bound of a float32 path
    assert_fa_rule("dense & causal", out, ref, None, floor=attention_floors(q, k, v)["out_alone"], seed=seed)


def _varlen_case(seed, dtype, lens_q, lens_k, h=6, hkv=2, d=32):
    g = torch.Generator().manual_seed(seed)
    cq = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q64 = torch.randn(int(cq[-1]), h, d, generator=g, dtype=torch.float64)
    k64 = torch.randn(int(ck[-1]), hkv, d, generator=g, dtype=torch.float64)
    v64 = torch.randn(int(ck[-1]), hkv, d, generator=g, dtype=torch.float64)
    low = [t.to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
    high = [t.detach().double().requires_grad_(True) for t in low]
    return cq, ck, high, low


@pytest.mark.parametrize("causal,window,use_alibi,softcap", [(False, (-1, -1), False, 0.0), (True, (-1, -1), True, 0.0),
                                                             (True, (25, 0), False, 6.0), (False, (10, 30), True, 0.0)])
def test_varlen_against_per_sequence_oracle(causal, window, use_alibi, softcap, seed):
    lens_q, lens_k = [1, 70, 0, 133, 64], [9, 70, 5, 100, 64]
    cq, ck, (q64, k64, v64), (q, k, v) = _varlen_case(seed, torch.float32, lens_q, lens_k)
    slopes = torch.rand(len(lens_q), 6, generator=torch.Generator().manual_seed(seed)) if use_alibi else None
    out, lse = memattn.attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal, window_size=window,
                                        alibi_slopes=slopes, softcap=softcap, return_lse=True)
    assert out.shape == q.shape and lse.shape == (6, q.shape[0])
    ours_g = grads([out, lse], (q, k, v))
    # ALiBi adds at most max(slope) * (longest distance) to a score
    alibi = 0.0 if slopes is None else amax(slopes) * max(lens_q + lens_k)
    floor = attention_floors(q, k, v, *cotangents([out, lse]), bias=alibi, keys=max(lens_k), rows=3 * max(lens_q))
    for i in range(len(lens_q)):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        if lens_q[i] == 0:
            continue
        sl = None if slopes is None else slopes[i]
        parts = []
        for (qq, kk, vv) in ((q64, k64, v64), (q, k, v)):
            qi, ki, vi = qq[qs][None], kk[ks][None], vv[ks][None]
            spec = build_spec(qi.shape, ki.shape[1], causal=causal, softmax_scale=None, key_padding_mask=None, window_size=window,
                              alibi_slopes=sl, softcap=softcap)
            dense = None if spec.mask is None else spec.mask.dense(lens_q[i], lens_k[i])
            parts.append(reference.attention(qi, ki, vi, mask=dense, bias=spec.dense_bias(lens_q[i], lens_k[i]),
                                             softcap=softcap, return_lse=True))
        (ro, rl), (no, nl) = parts
        assert_fa_rule(f"seq {i} out", out[qs], ro[0], no[0], floor=floor["out"], seed=seed)
        assert_fa_rule(f"seq {i} lse", lse[:, qs], rl[0], nl[0], floor=floor["lse"], seed=seed)
    # gradients: the packed oracle is the per-sequence oracles side by side
    ref_parts, nai_parts = [], []
    for i in range(len(lens_q)):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        sl = None if slopes is None else slopes[i]
        for dst, (qq, kk, vv) in ((ref_parts, (q64, k64, v64)), (nai_parts, (q, k, v))):
            qi, ki, vi = qq[qs][None], kk[ks][None], vv[ks][None]
            spec = build_spec(qi.shape, ki.shape[1], causal=causal, softmax_scale=None, key_padding_mask=None, window_size=window,
                              alibi_slopes=sl, softcap=softcap)
            dense = None if spec.mask is None else spec.mask.dense(lens_q[i], lens_k[i])
            o, l = reference.attention(qi, ki, vi, mask=dense, bias=spec.dense_bias(lens_q[i], lens_k[i]),
                                       softcap=softcap, return_lse=True)
            dst.append((o[0], l[0]))
    ref_o = torch.cat([o for o, _ in ref_parts]); ref_l = torch.cat([l for _, l in ref_parts], dim=1)
    nai_o = torch.cat([o for o, _ in nai_parts]); nai_l = torch.cat([l for _, l in nai_parts], dim=1)
    for name, g, rg, ng in zip("qkv", ours_g, grads([ref_o, ref_l], (q64, k64, v64)), grads([nai_o, nai_l], (q, k, v))):
        assert_fa_rule(f"varlen d{name}", g, rg, ng, factor=3.0, floor=floor[f"d{name}"], seed=seed)


def test_sliding_window_memory_is_linear_not_quadratic():
    # fwd+bwd with a 256 window: doubling S at most doubles the peak (plus slack), and the peak
    # stays far below even the dense *bool* mask (S^2 bytes)
    def peak_at(s):
        g = torch.Generator().manual_seed(s)
        q, k, v = (torch.randn(1, s, 2, 32, generator=g).requires_grad_(True) for _ in range(3))

        def run():
            memattn.attention(q, k, v, causal=True, window_size=(255, 0), method="blockwise").sum().backward()
        return measure(run)
    small, large = peak_at(16384), peak_at(32768)
    assert large <= 2.3 * small, f"peak grew {large / small:.2f}x when S doubled"
    assert large < 32768 ** 2 / 8, f"peak {large / 2**20:.1f} MiB vs dense bool mask {32768 ** 2 / 2**20:.0f} MiB"


def test_layout_cost_is_per_block_not_per_element():
    s = 1 << 18
    qe = ke = edges(s, 512)

    def build():
        return masks.sliding_window(4096, 0).block_kinds(s, s, qe, ke)
    peak = measure(build)
    assert peak < 64 * len(qe) ** 2  # a few bytes per tile; S^2 would be 64 GiB


def test_bad_masks_and_arguments():
    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    with pytest.raises(ValueError, match=">= -1"):
        memattn.attention(q, k, v, window_size=(-2, 0))
    with pytest.raises(TypeError, match="window_size"):
        memattn.attention(q, k, v, window_size=5)
    with pytest.raises(ValueError, match=r"\(heads,\) = \(4,\)"):
        memattn.attention(q, k, v, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="not broadcastable"):
        memattn.attention(q, k, v, mask=torch.ones(10, 11, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        memattn.attention(q, k, v, mask=torch.ones(10, 12))
    with pytest.raises(ValueError, match="softcap"):
        memattn.attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="covers 20 tokens"):
        memattn.attention(q, k, v, mask=masks.document([10, 10]))
    with pytest.raises(ValueError, match="stride"):
        masks.strided(0)
    with pytest.raises(ValueError, match="summary"):
        masks.fixed(4, 5)
    with pytest.raises(TypeError, match="callable"):
        masks.from_mask_mod(3, 10, 10)


def test_bad_varlen_inputs():
    q, k, v = torch.randn(10, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    good_q, good_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        memattn.attention_varlen(q, k, v, good_q.long(), good_k, 6, 7)
    with pytest.raises(ValueError, match="non-decreasing"):
        memattn.attention_varlen(q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32),
                                 torch.tensor([0, 5, 6, 12], dtype=torch.int32), 6, 7)
    with pytest.raises(ValueError, match=r"end at the number of packed tokens \(10\)"):
        memattn.attention_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), good_k, 6, 7)
    with pytest.raises(ValueError, match="has 1 sequences but cu_seqlens_q has 2"):
        memattn.attention_varlen(q, k, v, good_q, torch.tensor([0, 12], dtype=torch.int32), 6, 12)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        memattn.attention_varlen(q, k, v, good_q, good_k, 5, 7)
    with pytest.raises(ValueError, match="3 dims"):
        memattn.attention_varlen(q[None], k, v, good_q, good_k, 6, 7)
    with pytest.raises(ValueError, match=r"\(batch, heads\) = \(2, 4\)"):
        memattn.attention_varlen(q, k, v, good_q, good_k, 6, 7, alibi_slopes=torch.ones(3, 4))
