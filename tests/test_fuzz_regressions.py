"""The fuzzer's falsifying examples (issue 15), one explicit test each: the bug it found, fixed in src/.

The headline ones are written out against the float64 reference; the rest replay the fuzzer's case (a plain
dict, printed by the fuzzer when it failed) through that entry point's contract (``tests/fuzz``), in process.
The one that used to kill the process (SIGFPE) runs in a spawned worker, so a regression fails the test
instead of killing pytest.
"""
from __future__ import annotations

import pytest
import torch

import memattn
from memattn import reference
from conftest import assert_fa_rule, attention_floors

from fuzz.contract import OK
from fuzz.entries import ENTRIES
from fuzz.worker import Worker

METHODS = ("auto", "standard", "checkpoint", "blockwise")
NAN = float("nan")


def _each_method(q, k, v, **kw):
    out = {m: memattn.attention(q, k, v, method=m, **kw) for m in METHODS}
    with memattn.use_backend("torch"):
        out["blockwise/torch"] = memattn.attention(q, k, v, method="blockwise", **kw)
    return out


def test_empty_query_does_not_kill_the_process():
    """The issue's example: the fused CPU kernel divided by the empty length (SIGFPE, exit 136)."""
    w = Worker()
    try:
        case = {"b": 1, "sq": 0, "sk": 8, "hkv": 2, "h": 2, "d": 16, "dtype": "float32", "seed": 1,
                "layout": "contiguous", "special": "none", "causal": False, "grad": "qkv", "return_lse": True,
                "block_size": None, "invalid": "", "window": (-1, -1), "kpm": None, "dense_mask": None,
                "alibi": False, "softcap": 0.0}
        for name in ("attention[auto]", "attention[blockwise]"):
            assert w.run(name, case) == (OK, ""), name
        # the fuzzer's own falsifying example: batch 0, Sq 0, causal, window, ALiBi, block 1
        case.update(b=0, sq=0, sk=8, hkv=1, h=2, d=512, window=(3, 2), alibi=True, block_size=1)
        assert w.run("attention[auto]", case) == (OK, "")
    finally:
        w.close()


@pytest.mark.parametrize("shape_q,shape_k", [((1, 0, 2, 16), (1, 8, 2, 16)), ((1, 5, 2, 16), (1, 0, 2, 16)),
                                             ((0, 3, 2, 16), (0, 4, 2, 16)), ((0, 0, 1, 1), (0, 0, 1, 1))])
def test_empty_lengths_same_result_in_every_method(shape_q, shape_k):
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_k, requires_grad=True)
    v = torch.randn(shape_k, requires_grad=True)
    for name, (out, lse) in _each_method(q, k, v, return_lse=True).items():
        assert out.shape == q.shape, name
        assert torch.equal(out, torch.zeros_like(out)), name          # no key: out 0
        assert torch.isneginf(lse).all(), name                          # and lse -inf
        gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        for g, x in ((gq, q), (gk, k), (gv, v)):
            assert g is None or torch.equal(g, torch.zeros_like(x)), name


def test_nan_query_row_gives_nan_in_that_row_only_in_every_method():
    """auto and blockwise returned zeros there (the fused kernel reports an all-NaN row as unseen)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g) for n in (4, 8, 8))
    q[0, 1, 0, 3] = NAN
    ref = reference.attention(q.double(), k.double(), v.double())
    want = torch.isnan(ref)
    assert want[0, 1, 0].all() and int(want.sum()) == 16
    for name, out in _each_method(q, k, v).items():
        assert torch.equal(torch.isnan(out), want), name
        assert_fa_rule(name, out[~want], ref[~want], reference.attention(q, k, v)[~want],
                       floor=attention_floors(q, k, v)["out"])


def test_nan_query_row_without_visible_keys_gives_zeros():
    """A fully masked row is 0 even with NaN in its query (the additive mask left it NaN)."""
    q, k, v = torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8)
    q[0, 0] = NAN
    kpm = torch.tensor([[False, True, True]])  # causal row 0 sees only key 0, which is padding
    ref = reference.attention(q.double(), k.double(), v.double(), mask=torch.tensor(
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool) & kpm.view(1, 1, 1, 3))
    assert torch.equal(ref[0, 0], torch.zeros_like(ref[0, 0]))
    for name, out in _each_method(q, k, v, causal=True, key_padding_mask=kpm).items():
        assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0])), name
        assert torch.isfinite(out).all(), name


def test_unseen_nan_and_inf_keys_and_values_never_leak():
    """0 * inf and NaN + -inf turned masked NaN/inf keys and values into NaN rows, in every method (and in the
    reference itself)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 2, 16, generator=g) for _ in range(3))
    k[0, 3, 0, 0] = NAN
    v[0, 2, 1, 1] = float("inf")
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    ref = reference.attention(q.double(), k.double(), v.double(), mask=causal)
    # row i sees keys <= i: the NaN key (3) only in row 3 head 0; the inf value (key 2) in rows 2, 3 of head 1
    assert torch.isfinite(ref[0, :3, 0]).all() and torch.isnan(ref[0, 3, 0]).all()
    assert torch.isfinite(ref[0, :2, 1]).all() and torch.isposinf(ref[0, 2:, 1, 1]).all()
    for name, out in _each_method(q, k, v, causal=True).items():
        for what in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(what(out), what(ref.float())), name


def test_visible_keys_with_minus_inf_scores_count_as_no_key():
    """standard gave NaN where the reference (and the tiled paths) give 0 / -inf: the only visible key has an
    inf component that makes its score -inf."""
    q = torch.ones(1, 1, 1, 4)
    k = torch.randn(1, 3, 1, 4)
    k[0, 0, 0, 2] = -float("inf")
    kpm = torch.tensor([[True, False, False]])
    for name, (out, lse) in _each_method(q, k, torch.randn(1, 3, 1, 4), key_padding_mask=kpm,
                                         return_lse=True).items():
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all(), name


# The fuzzer's falsifying examples, replayed through their entry point's contract (tests/fuzz).
_BASE = {"b": 1, "hkv": 1, "h": 1, "layout": "contiguous", "special": "none", "grad": "", "return_lse": True,
         "block_size": None, "invalid": "", "window": (-1, -1), "kpm": None, "dense_mask": None, "alibi": False,
         "softcap": 0.0}
CASES = [
    # masks.edges: block 0 when Sq = Sk = 0 (auto's one query block), ZeroDivisionError
    ("attention[auto]", dict(_BASE, b=0, sq=0, sk=0, d=1, dtype="float16", seed=0, causal=False)),
    # schedule.band_chunks divided by a zero-byte block for batch 0
    ("attention[blockwise]", dict(_BASE, b=0, sq=70, sk=70, hkv=2, h=2, d=31, dtype="bfloat16", seed=83, causal=True,
                                  grad="kv", block_size=3, window=(1, 0), alibi=True, layout="sliced")),
    # the torch tile's reshape(-1) of an empty tile
    ("attention[blockwise/torch]", dict(_BASE, b=0, sq=1, sk=33, hkv=2, h=4, d=64, dtype="float16", seed=2307054,
                                        causal=False, grad="kv", block_size=3, window=(2, -1), kpm=13, softcap=5.0)),
    # standard's softcap in float16 (three roundings) outside the FA rule
    ("attention[standard]", dict(_BASE, sq=3, sk=3, d=111, dtype="float16", seed=1745, special="inf_q", causal=True,
                                 grad="q", layout="transposed", softcap=5.0)),
    # a NaN query row's gradient reached keys it cannot see (exp(-inf - NaN) in the torch tile's backward)
    ("attention[blockwise]", dict(_BASE, b=2, sq=3, sk=33, hkv=2, h=2, d=31, dtype="float16", seed=11413,
                                  special="nan_q", causal=True, grad="qkv", window=(3, 2))),
    # an inf query in a masked tile: inf + -inf under the fused kernel's additive mask
    ("attention[auto]", dict(_BASE, sq=5, sk=8, d=256, dtype="float32", seed=5754, special="inf_q", causal=False,
                             grad="kv", window=(3, 2), kpm=671, dense_mask=122, alibi=True)),
    # a masked NaN query row under softcap: 0 * tanh'(NaN) made its dq NaN in the torch tile's backward
    ("attention[auto]", dict(_BASE, b=2, sq=33, sk=1, d=128, dtype="float32", seed=831710, special="nan_q_row",
                             causal=True, grad="q", kpm=902, softcap=5.0)),
    # a fully masked NaN query row: NaN + -inf under the fused backward's additive mask reached dq and dv
    ("attention[auto]", dict(_BASE, b=2, sq=13, sk=8, d=7, dtype="bfloat16", seed=326817980, special="nan_q",
                             grad="qkv", block_size=16, window=(3, 2), dense_mask=65536, causal=False)),
    # standard: softcap's tanh'(NaN) of a masked score reached dk of keys the NaN row cannot see
    ("attention[standard]", dict(_BASE, sq=5, sk=8, h=3, d=512, dtype="bfloat16", seed=1716, special="nan_q",
                                 causal=True, grad="qkv", kpm=3517, dense_mask=224, alibi=True, softcap=5.0)),
    # every sequence with 0 queries: out.view(b, 0, h, -1) in paged_attention
    ("paged_attention[gather]", {"ctx": [0, 0, 0], "lq": [0, 0, 0], "block_size": 1, "extra_blocks": 0,
                                 "repeat_ids": False, "hkv": 1, "h": 1, "d": 1, "dtype": "float16", "causal": True,
                                 "window": (-1, -1), "alibi": False, "softcap": 0.0, "special": "none", "seed": 0,
                                 "invalid": ""}),
    # the native decode kernel's max skips NaN: a NaN query through softcap came back as 0
    ("paged_attention[native]", {"ctx": [1, 2, 2], "lq": [1, 1, 1], "block_size": 3, "extra_blocks": 4,
                                 "repeat_ids": True, "hkv": 2, "h": 6, "d": 64, "dtype": "float16", "causal": False,
                                 "window": (-1, -1), "alibi": False, "softcap": 3.0, "special": "nan_q", "seed": 1,
                                 "invalid": ""}),
    # PagedKVCache.write: a layer out of range raised IndexError from inside torch
    ("cache.PagedKVCache.write", {"layers": 1, "nb": 5, "bs": 4, "hkv": 1, "d": 4, "slots": [10], "layer": 1,
                                  "slot_dtype": "int64", "bad_shape": False, "seed": 3399}),
    # and its out-of-range slot message did not name slot_mapping
    ("cache.PagedKVCache.write", {"layers": 1, "nb": 1, "bs": 3, "hkv": 1, "d": 1, "slots": [4], "layer": 0,
                                  "slot_dtype": "int64", "bad_shape": False, "seed": 14650}),
    # memattn masks show "causal(3)": Python's TypeError without the spec
    ("masks+masks_show", {"spec": "causal(3)", "seq_len": 16, "block": 0, "seed": 69136}),
    # global_tokens('a'): torch.as_tensor's "too many dimensions 'str'"
    ("masks+masks_show", {"spec": "global_tokens('a')", "seq_len": 1, "block": 1, "seed": 0}),
    # memory.estimate(seqlen=None): int(None) inside
    ("memory.estimate", {"method": "window", "batch": 7, "seqlen": None, "heads": -1, "head_dim": 10**12,
                         "dtype": "bfloat16", "backward": False, "layers": 10**12, "block_size": 1024, "threads": 4}),
]


@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_fuzzer_falsifying_example(name, case):
    ENTRIES[name].check(case)


def test_triton_tile_masked_nan_value_does_not_leak():
    """The Triton tile's masked products (0 * NaN) leaked a NaN value into rows that cannot see it."""
    from memattn.kernels import triton_installed, triton_tiles
    if not triton_installed() or not triton_tiles().interpreting():
        pytest.skip("needs triton under TRITON_INTERPRET=1 (CPU)")
    ENTRIES["attention[blockwise/triton]"].check(dict(
        _BASE, b=2, sq=5, sk=3, d=256, dtype="float16", seed=554815, layout="sliced", special="nan_v", causal=True,
        block_size=16, window=(2, -1), softcap=5.0))


def test_triton_interpreter_refuses_bfloat16():
    """Under the interpreter (numpy, no bfloat16) the kernels returned garbage (errors of 8e8) for bf16."""
    from memattn.kernels import triton_installed, triton_tiles
    if not triton_installed():
        pytest.skip("triton is not installed")
    if not triton_tiles().interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (CPU)")
    q = torch.randn(1, 3, 1, 16).to(torch.bfloat16)
    with pytest.raises(ValueError, match="triton tile backend cannot run"):
        with memattn.use_backend("triton"):
            memattn.attention(q, q, q, method="blockwise")


def test_minus_inf_sink_on_a_row_without_keys_gives_zeros_in_every_method():
    """merge_sinks took logaddexp(-inf, -inf) (exp(-inf - -inf) = NaN) for a row that saw no key under a -inf
    sink: NaN where the reference (and the same call without sinks) gives 0 and lse -inf. Fuzzer's case:
    causal, window (2, -1), a key padding mask, nan_v, sinks (523, '-inf', False, True)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 8, generator=g, requires_grad=True) for n in (4, 4, 4))
    kpm = torch.tensor([[False, False, True, True]])  # rows 0 and 1 (causal) see no key
    sinks = torch.tensor([float("-inf"), 1.5], requires_grad=True)
    mask = (torch.ones(4, 4, dtype=torch.bool).tril() & kpm.view(1, 4))[None, None]
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), mask=mask, sinks=sinks.double(), return_lse=True)
    assert torch.equal(ref[0, :2, 0], torch.zeros(2, 8, dtype=torch.float64))
    for name, (out, lse) in _each_method(q, k, v, causal=True, key_padding_mask=kpm, sinks=sinks, return_lse=True).items():
        assert not torch.isnan(out).any(), name
        assert torch.equal(out[0, :2, 0], torch.zeros(2, 8)), name
        assert torch.isneginf(lse[0, 0, :2]).all(), name
        assert_fa_rule(name, out, ref, reference.attention(q, k, v, mask=mask, sinks=sinks),
                       floor=attention_floors(q, k, v)["out"])
        grads = torch.autograd.grad(out.sum(), (q, k, v, sinks))
        assert all(torch.isfinite(gr).all() for gr in grads), name


def test_plus_inf_sink_gives_nan_in_every_row_of_its_head_as_the_reference():
    """A +inf sink silenced its head to zeros (exp(lse - inf) = 0) where the reference's softmax is
    exp(inf - inf) = NaN: the fault was hidden. Now NaN in every row of that head (a row with no visible key
    and Sk = 0 too, in the reference as in every method), the other heads untouched."""
    g = torch.Generator().manual_seed(4)
    for sk in (5, 0):
        q, k, v = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, sk, 2, 8, generator=g), torch.randn(1, sk, 2, 8, generator=g)
        sinks = torch.tensor([float("inf"), 0.5])
        ref = reference.attention(q.double(), k.double(), v.double(), sinks=sinks.double())
        assert torch.isnan(ref[:, :, 0]).all() and not torch.isnan(ref[:, :, 1]).any()
        for name, out in _each_method(q, k, v, sinks=sinks).items():
            assert torch.equal(torch.isnan(out), torch.isnan(ref)), (name, sk)
        if sk:  # paged: one block holding the sk tokens, the last query decoding
            out = memattn.paged_attention(q[0, -1:].unsqueeze(0), k, v, torch.zeros(1, 1, dtype=torch.int32),
                                          torch.tensor([sk], dtype=torch.int32), sinks=sinks)
            assert torch.isnan(out[..., 0, :]).all() and not torch.isnan(out[..., 1, :]).any()


def test_plus_inf_score_gives_nan_row_in_every_method():
    """The fused CPU kernel returned out 0 (lse +inf) for a row with a +inf score (a -inf query entry against
    keys of both signs), where the reference's softmax is exp(inf - inf) = NaN: auto and blockwise hid the
    fault. Fuzzer's case: attention[auto] bfloat16, b 2, Sq 2, Sk 33, D 16, inf_q, block_size 1, seed 300."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 1, 16, generator=g).to(torch.bfloat16) for n in (2, 33, 33))
    q[0, 0, 0, 1] = float("-inf")
    ref = reference.attention(q.double(), k.double(), v.double())
    assert torch.isnan(ref[0, 0]).all() and not torch.isnan(ref[0, 1]).any()
    for name, out in _each_method(q, k, v).items():
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), name
    for case in ({'b': 2, 'sq': 2, 'sk': 33, 'hkv': 1, 'h': 1, 'd': 16, 'dtype': 'bfloat16', 'seed': 300,
                  'layout': 'contiguous', 'special': 'inf_q', 'causal': False, 'grad': '', 'return_lse': True,
                  'block_size': 1, 'invalid': '', 'window': (-1, -1), 'kpm': None, 'dense_mask': None,
                  'alibi': False, 'softcap': 0.0, 'sinks': None},):
        for name in ("attention[auto]", "attention[blockwise]"):
            ENTRIES[name].check(case)
