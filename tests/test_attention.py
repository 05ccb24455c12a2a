"""Exact attention (standard, checkpoint, blockwise with both tiles, auto) against the float64 oracle."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memattn
from memattn import reference
from memattn.masks import causal as causal_mask
from memattn.ops.blockwise import blockwise_attention
from memattn.ops.spec import build_spec

from conftest import amax, assert_fa_rule, attention_floors, cotangents, fa_floor, grads, rand_qkv

SHAPES = [(1, 147), (113, 203), (128, 217), (1023, 1024), (1024, 1023)]
HEAD_DIMS = [32, 40, 59, 64, 111, 128]
KV_HEADS = [9, 3, 1]


def run_path(path, q, k, v, *, causal=False, key_padding_mask=None, block=None):
    """Run one path by name and return (out, lse)."""
    if path in ("standard", "checkpoint", "blockwise", "auto"):
        return memattn.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, method=path,
                                 block_size=block, return_lse=True)
    impl = path.split(":")[1]  # "tiles:torch" / "tiles:cpu_flash"
    spec = build_spec(q.shape, k.shape[1], causal=causal, softmax_scale=None, key_padding_mask=key_padding_mask)
    bs = block or (67 if q.shape[1] * k.shape[1] < 100_000 else 211)  # deliberately does not divide the lengths
    return blockwise_attention(q, k, v, spec, bs, bs + 10, impl)


def oracle(q, k, v, *, causal=False, key_padding_mask=None):
    sq, sk = q.shape[1], k.shape[1]
    mask = causal_mask().dense(sq, sk) if causal else None
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        mask = kp if mask is None else mask & kp
    return reference.attention(q, k, v, mask=mask, return_lse=True)


PATHS = ["standard", "checkpoint", "blockwise", "auto", "tiles:torch", "tiles:cpu_flash"]


def check_all_paths(paths, b, sq, sk, h, hkv, d, dtype, seed, causal=False, kpm=None, block=None,
                    with_grads=True):
    """Every path's out, lse and gradients (through out and lse) against the float64 oracle, FA rule."""
    (q64, k64, v64), (q, k, v) = rand_qkv(b, sq, sk, h, hkv, d, dtype, seed)
    ref_o, ref_l = oracle(q64, k64, v64, causal=causal, key_padding_mask=kpm)
    nai_o, nai_l = oracle(q, k, v, causal=causal, key_padding_mask=kpm)
    if with_grads:
        ref_g = grads([ref_o, ref_l], (q64, k64, v64))
        nai_g = grads([nai_o, nai_l], (q, k, v))
    floor = attention_floors(q, k, v, *cotangents([nai_o, nai_l]))
    failures = []
    for path in paths:
        out, lse = run_path(path, q, k, v, causal=causal, key_padding_mask=kpm, block=block)
        try:
            assert out.dtype == dtype and out.shape == q.shape, f"{path}: out {out.dtype} {tuple(out.shape)}"
            assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{path}: NaN"
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_l)), f"{path}: -inf lse rows differ"
            assert_fa_rule(f"{path} out", out, ref_o, nai_o, floor=floor["out"], seed=seed)
            assert_fa_rule(f"{path} lse", lse, ref_l, nai_l, floor=floor["lse"], seed=seed)
            if with_grads:
                for name, g, rg, ng in zip("qkv", grads([out, lse], (q, k, v)), ref_g, nai_g):
                    assert torch.isfinite(g).all(), f"{path}: d{name} not finite"
                    # with one or two visible keys the naive softmax backward is almost exact while FA-2's
                    # delta = rowsum(dO * O) rounds differently: the floor bounds that (conftest.attention_floors)
                    assert_fa_rule(f"{path} d{name}", g, rg, ng, factor=3.0, floor=floor[f"d{name}"], seed=seed)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


GRID = [(i, sq, sk, c) for i, (sq, sk) in enumerate(SHAPES) for c in (False, True)]


@pytest.mark.parametrize("i,sq,sk,causal", GRID, ids=[f"Sq{sq}-Sk{sk}-{'causal' if c else 'full'}" for _, sq, sk, c in GRID])
def test_grid_float32(i, sq, sk, causal, seed):
    # every head dim and every kv-head count appears across the grid
    d = HEAD_DIMS[(2 * i + causal) % len(HEAD_DIMS)]
    hkv = KV_HEADS[(i + causal) % len(KV_HEADS)]
    b = 1 if sq > 512 else 2
    check_all_paths(PATHS, b, sq, sk, 9, hkv, d, torch.float32, seed, causal=causal)


@pytest.mark.parametrize("sq,sk", [(1, 147), (113, 203), (217, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(sq, sk, dtype, seed):
    check_all_paths(PATHS, 2, sq, sk, 9, 3, 40, dtype, seed, causal=True)


@pytest.mark.parametrize("path", PATHS)
def test_float64_tight(path, seed):
    (q64, k64, v64), _ = rand_qkv(2, 113, 203, 9, 3, 59, torch.float64, seed)
    ref_o, ref_l = oracle(q64, k64, v64, causal=True)
    out, lse = run_path(path, q64, k64, v64, causal=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    # float64 path against the float64 oracle: no naive run to compare with, the floor alone (float64 eps)
    floor = attention_floors(q64, k64, v64, *cotangents([ref_o, ref_l]))
    assert_fa_rule(f"{path} out", out, ref_o, None, floor=floor["out_alone"], seed=seed)
    assert_fa_rule(f"{path} lse", lse, ref_l, None, floor=floor["lse"], seed=seed)
    for name, g, rg in zip("qkv", grads([out, lse], (q64, k64, v64)), grads([ref_o, ref_l], (q64, k64, v64))):
        assert_fa_rule(f"{path} d{name}", g, rg, None, floor=floor[f"d{name}_alone"], seed=seed)


def test_causal_bottom_right_alignment():
    # Sq=2, Sk=5: row 0 sees keys 0..3, row 1 sees 0..4 (FlashAttention >= 2.1)
    m = causal_mask().dense(2, 5)[0, 0].int().tolist()
    assert m == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    (q64, k64, v64), _ = rand_qkv(1, 2, 5, 1, 1, 8, torch.float64, 7, requires_grad=False)
    out = memattn.attention(q64, k64, v64, causal=True, method="blockwise", block_size=1)
    row0 = reference.attention(q64[:, :1], k64[:, :4], v64[:, :4])
    assert_fa_rule("row 0", out[:, :1], row0, None, floor=attention_floors(q64, k64, v64)["out_alone"])


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_with_fully_masked_rows(causal, seed):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(3, 203, generator=g) > 0.4
    kpm[1] = False            # sequence 1: no key at all -> every row fully masked
    kpm[2, :150] = False      # sequence 2: with causal Sq > Sk, early rows see nothing
    check_all_paths(PATHS, 3, 250, 203, 6, 2, 32, torch.float32, seed, causal=causal, kpm=kpm)
    (q64, k64, v64), _ = rand_qkv(3, 250, 203, 6, 2, 32, torch.float64, seed)
    out, lse = memattn.attention(q64, k64, v64, causal=causal, key_padding_mask=kpm, method="blockwise",
                                 return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    dq, dk, dv = grads([out], (q64, k64, v64))
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("path", ["blockwise", "auto", "tiles:torch"])
def test_backward_is_deterministic(path, seed):
    _, (q, k, v) = rand_qkv(2, 200, 200, 4, 2, 32, torch.float32, seed)
    first = None
    for _ in range(20):
        out, lse = run_path(path, q, k, v, causal=True, block=48)
        g = grads([out, lse], (q, k, v))
        if first is None:
            first = g
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, g))


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), sq=st.integers(1, 90), sk=st.integers(1, 90), hkv=st.sampled_from([1, 2, 3]),
       groups=st.integers(1, 3), d=st.integers(1, 48), causal=st.booleans(), block=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes(b, sq, sk, hkv, groups, d, causal, block, seed):
    check_all_paths(["blockwise", "tiles:torch", "tiles:cpu_flash", "standard"], b, sq, sk, hkv * groups, hkv, d,
                    torch.float32, seed, causal=causal, block=block)


def test_merge_attention_equals_attention_over_union(seed):
    (q, k, v), _ = rand_qkv(2, 33, 80, 4, 2, 16, torch.float64, seed, requires_grad=False)
    oa, la = reference.attention(q, k[:, :30], v[:, :30], return_lse=True)
    ob, lb = reference.attention(q, k[:, 30:], v[:, 30:], return_lse=True)
    full_o, full_l = reference.attention(q, k, v, return_lse=True)
    o, l = memattn.merge_attention(oa, la, ob, lb)
    floor = attention_floors(q, k, v)  # merged parts against one softmax: both float64, the floor alone
    assert_fa_rule("merged out", o, full_o, None, floor=floor["out_alone"], seed=seed)
    assert_fa_rule("merged lse", l, full_l, None, floor=floor["lse"], seed=seed)
    empty_o, empty_l = torch.zeros_like(oa), torch.full_like(la, float("-inf"))
    o, l = memattn.merge_attention(oa, la, empty_o, empty_l)
    # merging with nothing: a two-term weighted sum (weights 1 and 0) and lse + log(1 + 0)
    assert_fa_rule("out merged with empty", o, oa, None, floor=fa_floor(o.dtype, amax(oa), 2), seed=seed)
    assert_fa_rule("lse merged with empty", l, la, None, floor=fa_floor(l.dtype, 1.0, 2), seed=seed)
    o, l = memattn.merge_attention(empty_o, empty_l, empty_o, empty_l)
    assert torch.equal(o, empty_o) and torch.isneginf(l).all()
    with pytest.raises(ValueError, match="lse shape"):
        memattn.merge_attention(oa, la.transpose(1, 2), ob, lb.transpose(1, 2))


def test_lse_gradient_matches_oracle(seed):
    (q64, k64, v64), (q, k, v) = rand_qkv(2, 100, 130, 4, 4, 32, torch.float32, seed)
    _, ref_l = oracle(q64, k64, v64, causal=True)
    _, nai_l = oracle(q, k, v, causal=True)
    rg, ng = grads([ref_l], (q64, k64, v64)), grads([nai_l], (q, k, v))
    floor = attention_floors(q, k, v, torch.zeros(()), *cotangents([nai_l]))  # no cotangent on out
    for path in ["blockwise", "auto", "tiles:torch", "standard", "checkpoint"]:
        _, lse = run_path(path, q, k, v, causal=True)
        for name, g, r, n in zip("qkv", grads([lse], (q, k, v)), rg, ng):
            assert_fa_rule(f"{path} d{name} via lse only", g, r, n, factor=3.0, floor=floor[f"d{name}"], seed=seed)


@pytest.mark.parametrize("bad,match,exc", [
    (dict(q=(2, 10, 4)), "4 dims", ValueError),
    (dict(k=(3, 12, 2, 16)), "batch sizes differ", ValueError),
    (dict(k=(2, 12, 2, 8)), "head_dim", ValueError),
    (dict(k=(2, 12, 3, 16), v=(2, 12, 3, 16)), "multiple of key/value heads", ValueError),
    (dict(v=(2, 11, 2, 16)), "same seqlen", ValueError),
])
def test_bad_shapes(bad, match, exc):
    shapes = dict(q=(2, 10, 4, 16), k=(2, 12, 2, 16), v=(2, 12, 2, 16))
    shapes.update(bad)
    t = {n: torch.randn(*s) for n, s in shapes.items()}
    with pytest.raises(exc, match=match):
        memattn.attention(t["q"], t["k"], t["v"])


def test_bad_arguments():
    q, k, v = torch.randn(2, 10, 4, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    with pytest.raises(TypeError, match="share a dtype"):
        memattn.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="unknown method"):
        memattn.attention(q, k, v, method="fast")
    with pytest.raises(ValueError, match="block_size must be > 0"):
        memattn.attention(q, k, v, method="blockwise", block_size=0)
    with pytest.raises(ValueError, match=r"\(batch, seqlen_k\) = \(2, 12\)"):
        memattn.attention(q, k, v, key_padding_mask=torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        memattn.attention(q, k, v, key_padding_mask=torch.ones(2, 12))
    with pytest.raises(TypeError, match="unexpected keyword"):
        memattn.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(TypeError, match="dtype"):
        memattn.attention(q.int(), k.int(), v.int())
    meta = torch.randn(2, 12, 2, 16, device="meta")
    with pytest.raises(ValueError, match="one device"):
        memattn.attention(q, meta, v)
