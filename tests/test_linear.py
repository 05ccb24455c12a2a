"""Linear attention: chain of trust naive -> recurrent -> chunked (outputs, final states, all gradients),
half precision against float64, long-sequence stability, decoding, FAVOR+, bad input.

Pass rule for a path computing in dtype T (DESIGN.md): max|out - ref64| <= 2 max|naive_T - ref64| + floor,
gradients with factor 3, the floor derived from the operands (conftest.linear_floors). Inputs are random,
seeded per test (conftest's `seed` fixture: stable across runs, in every failure message).
"""
from __future__ import annotations

import pytest
import torch

import memattn
from conftest import assert_fa_rule, linear_floors
from memattn.ops.linear import FavorFeatures, LinearAttentionState, favor_sweep, linear_attention

F64_TOL = 1e-10  # float64 paths with other feature maps than elu: relative to the reference's largest magnitude


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(gen, *shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def make_inputs(gen, b, s, h, d, hkv=None, dtype=torch.float64, state=True, scale=1.0, dphi=None):
    hkv = hkv or h
    q, k, v = rand(gen, b, s, h, d, dtype=dtype, scale=scale), rand(gen, b, s, hkv, d, dtype=dtype, scale=scale), \
        rand(gen, b, s, hkv, d, dtype=dtype)
    init = None
    if state:
        dphi = dphi or d
        kv0 = torch.rand(b, h, dphi, d, generator=gen, dtype=torch.float64).requires_grad_()
        z0 = torch.rand(b, h, dphi, generator=gen, dtype=torch.float64).requires_grad_()
        init = (kv0, z0)
    return q, k, v, init


def loss_weights(gen, tensors):
    """The loss weights `run` draws for (out, kv, z) from `gen`."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    # Weights rounded through bfloat16 are exact in every dtype, so all paths see one loss.
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).bfloat16().to(t.dtype) for t in tensors]


def run(q, k, v, init, gen, **kwargs):
    """Outputs, final state and the gradients of a loss on both w.r.t. every input (and init)."""
    out, (kv, z) = linear_attention(q, k, v, initial_state=init, output_final_state=True, **kwargs)
    w = loss_weights(gen, (out, kv, z))
    loss = sum((t * wt).sum() for t, wt in zip((out, kv, z), w))
    leaves = [q, k, v] + (list(init) if init is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    return {"out": out, "kv": kv, "z": z, **{f"d{n}": t for n, t in zip(["q", "k", "v", "kv0", "z0"], grads)}}


def assert_f64_close(a: dict, b: dict, what: str, floors: dict | None = None, seed=None):
    """Two float64 paths: within the float64 floor of each quantity (conftest.linear_floors covers both
    sides' rounding), or, for feature maps the floor does not model, within F64_TOL of the magnitude."""
    assert a.keys() == b.keys()
    if floors is not None:
        for name in a:
            assert_fa_rule(f"{what}: {name}", a[name].detach(), b[name].detach(), None, floor=floors[name], seed=seed)
        return
    for name in a:
        scale = b[name].abs().max().item() + 1.0
        err = (a[name] - b[name]).abs().max().item()
        assert err <= F64_TOL * scale, f"{what}: {name} differs by {err:.3e} (scale {scale:.3e})"


def detached64(t):
    return t.detach().double().requires_grad_()


# ---------------------------------------------------------------- chain of trust (float64)

@pytest.mark.parametrize("s", [63, 500, 1000])
def test_chain_naive_recurrent_chunked(gen, seed, s):
    q, k, v, init = make_inputs(gen, 1, s, 2, 60)
    naive = run(q, k, v, init, gen=torch.Generator().manual_seed(s), causal=True, form="naive")
    rec = run(q, k, v, init, gen=torch.Generator().manual_seed(s), causal=True, form="recurrent")
    w = loss_weights(torch.Generator().manual_seed(s), (naive["out"], naive["kv"], naive["z"]))
    floors = linear_floors(q, k, v, init, w, causal=True)
    assert_f64_close(rec, naive, "recurrent vs naive", floors, seed)
    chunk = run(q, k, v, init, gen=torch.Generator().manual_seed(s), causal=True, form="chunked", chunk_size=64)
    assert_f64_close(chunk, rec, "chunked vs recurrent", floors, seed)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 200])
def test_chunked_any_chunk_size_gqa_no_state(gen, seed, chunk_size):
    # 9 query heads on 3 kv heads, no initial state, chunk sizes below / not dividing / above S.
    q, k, v, _ = make_inputs(gen, 2, 113, 9, 40, hkv=3, state=False)
    ref = run(q, k, v, None, gen=torch.Generator().manual_seed(0), causal=True, form="naive")
    got = run(q, k, v, None, gen=torch.Generator().manual_seed(0), causal=True, form="chunked",
              chunk_size=chunk_size)
    w = loss_weights(torch.Generator().manual_seed(0), (ref["out"], ref["kv"], ref["z"]))
    assert_f64_close(got, ref, f"chunked(C={chunk_size}) vs naive", linear_floors(q, k, v, None, w, causal=True),
                     seed)


@pytest.mark.parametrize("form", ["naive", "recurrent", "chunked"])
def test_empty_sequence_keeps_the_state(gen, form):
    q, k, v, init = make_inputs(gen, 1, 0, 2, 8)
    out, (kv, z) = linear_attention(q, k, v, causal=True, form=form, initial_state=init, output_final_state=True)
    assert out.shape == (1, 0, 2, 8) and torch.equal(kv, init[0]) and torch.equal(z, init[1])


def test_noncausal_matches_naive_with_unequal_lengths(gen, seed):
    q = rand(gen, 2, 147, 3, 32)
    _, k, v, init = make_inputs(gen, 2, 203, 3, 32)
    ref = run(q, k, v, init, gen=torch.Generator().manual_seed(1), form="naive")
    got = run(q, k, v, init, gen=torch.Generator().manual_seed(1), form="noncausal")
    w = loss_weights(torch.Generator().manual_seed(1), (ref["out"], ref["kv"], ref["z"]))
    assert_f64_close(got, ref, "noncausal vs naive", linear_floors(q, k, v, init, w, causal=False), seed)
    assert torch.equal(linear_attention(q, k, v), linear_attention(q, k, v, form="noncausal"))


def test_naive_is_the_textbook_formula(gen):
    # The oracle itself against a direct transcription: out_i = phi(q_i).S_i / (phi(q_i).z_i + eps).
    q, k, v, _ = make_inputs(gen, 1, 50, 2, 8, state=False)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    fq, fk = phi(q), phi(k)
    rows = []
    for i in range(50):
        s = torch.einsum("bjhd,bjhe->bhde", fk[:, : i + 1], v[:, : i + 1])
        z = fk[:, : i + 1].sum(1)
        rows.append(torch.einsum("bhd,bhde->bhe", fq[:, i], s) / ((fq[:, i] * z).sum(-1, keepdim=True) + 1e-6))
    expect = torch.stack(rows, 1)
    got = linear_attention(q, k, v, causal=True, form="naive")
    assert (got - expect).abs().max().item() < 1e-12


@pytest.mark.parametrize("feature_map", ["relu", "identity", "favor", "square"])
def test_feature_maps_chunked_vs_naive(gen, feature_map):
    fm = (lambda x: x * x) if feature_map == "square" else feature_map
    normalize = feature_map != "identity"  # identity features have no positive normaliser
    dphi = int(16 * torch.log(torch.tensor(16.0)).item()) if feature_map == "favor" else 16
    q, k, v, init = make_inputs(gen, 1, 90, 2, 16, dphi=dphi)
    kw = dict(causal=True, feature_map=fm, normalize=normalize, chunk_size=32)
    ref = run(q, k, v, init, gen=torch.Generator().manual_seed(2), form="naive", **kw)
    got = run(q, k, v, init, gen=torch.Generator().manual_seed(2), form="chunked", **kw)
    assert_f64_close(got, ref, f"{feature_map}: chunked vs naive")


# ---------------------------------------------------------------- half precision against float64

def rule_failures(path: dict, naive_t: dict, ref64: dict, floors: dict, seed):
    """The DESIGN.md pass rule (outputs and states x2, gradients x3) on every quantity: its failure messages."""
    bad = []
    for name in ref64:
        try:
            assert_fa_rule(name, path[name].detach(), ref64[name].detach(), naive_t[name].detach(),
                           factor=2.0 if name in ("out", "kv", "z") else 3.0, floor=floors[name], seed=seed)
        except AssertionError as e:
            bad.append(str(e))
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal, form", [(True, "chunked"), (True, "recurrent"), (False, "noncausal")])
def test_low_precision_against_float64(gen, seed, dtype, causal, form):
    # Scale 3 pushes phi(q).z past float16's 65504: a float16 normaliser would overflow.
    s = 300 if form == "recurrent" else 1000
    q, k, v, init = make_inputs(gen, 1, s, 2, 60, dtype=dtype, scale=3.0)
    q64, k64, v64 = (detached64(t) for t in (q, k, v))
    init64 = tuple(detached64(t) for t in init)
    ref64 = run(q64, k64, v64, init64, gen=torch.Generator().manual_seed(3), causal=causal, form="naive")
    naive_t = run(q, k, v, init, gen=torch.Generator().manual_seed(3), causal=causal, form="naive")
    path = run(q, k, v, init, gen=torch.Generator().manual_seed(3), causal=causal, form=form)
    assert path["out"].dtype == dtype and path["kv"].dtype == torch.float32
    assert torch.isfinite(path["out"]).all()
    # A token-by-token recurrence adds its rounding one step at a time (its dkv0 is a chain of S
    # additions, the naive form's one matmul): the floor's sqrt(S) growth bounds that.
    floors = linear_floors(q, k, v, init, loss_weights(torch.Generator().manual_seed(3), (path["out"], path["kv"],
                                                                                       path["z"])), causal=causal)
    bad = rule_failures(path, naive_t, ref64, floors, seed)
    assert not bad, f"{dtype} {form}:\n" + "\n".join(bad)


def test_long_sequence_is_stable(gen, seed):
    # S = 65536 forward in float16: float32 states stay accurate, nothing overflows.
    q, k, v = (torch.randn(1, 65536, 1, 16, generator=gen).half() for _ in range(3))
    out, (kv, z) = linear_attention(q, k, v, causal=True, output_final_state=True)
    out64, (kv64, z64) = linear_attention(q.double(), k.double(), v.double(), causal=True, output_final_state=True)
    assert torch.isfinite(out).all()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, out64) < 2e-3, seed  # float16 output rounding is 2^-11 relative
    assert rel(kv, kv64) < 1e-5 and rel(z, z64) < 1e-5, seed
    # The last rows agree with a recurrence started from the chunked state a few tokens earlier.
    _, st = linear_attention(q[:, :-8], k[:, :-8], v[:, :-8], causal=True, output_final_state=True)
    tail = linear_attention(q[:, -8:], k[:, -8:], v[:, -8:], causal=True, form="recurrent", initial_state=st)
    assert rel(tail, out64[:, -8:]) < 2e-3, seed


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_decode_continues_prefill(gen, feature_map):
    q, k, v, _ = make_inputs(gen, 2, 77, 3, 24, state=False)
    q, k, v = q.detach(), k.detach(), v.detach()
    full = linear_attention(q, k, v, causal=True, feature_map=feature_map)
    pre, state = linear_attention(q[:, :50], k[:, :50], v[:, :50], causal=True, feature_map=feature_map,
                                  output_final_state=True, chunk_size=16)
    dec = LinearAttentionState(state, feature_map=feature_map)
    outs = [dec.step(q[:, t], k[:, t], v[:, t]) for t in range(50, 77)]
    got = torch.cat([pre, torch.stack(outs, dim=1)], dim=1)
    assert (got - full).abs().max().item() < 1e-12
    assert dec.kv.shape == state[0].shape and dec.z.shape == state[1].shape


def test_decode_from_zeros_matches_recurrent_in_half_precision(gen):
    q, k, v, _ = make_inputs(gen, 1, 40, 2, 16, dtype=torch.bfloat16, state=False)
    dec = LinearAttentionState.zeros(1, 2, 16, 16)
    got = torch.stack([dec.step(q[:, t], k[:, t], v[:, t]) for t in range(40)], dim=1)
    ref = linear_attention(q, k, v, causal=True, form="recurrent")
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref.float()).abs().max() <= 2**-7 * ref.float().abs().max()


# ---------------------------------------------------------------- FAVOR+

def test_favor_is_deterministic_and_redraws(gen):
    q, k, v, _ = make_inputs(gen, 1, 64, 2, 16, state=False)
    a = linear_attention(q, k, v, feature_map=FavorFeatures(32, seed=5))
    fm = FavorFeatures(32, seed=5)
    assert torch.equal(a, linear_attention(q, k, v, feature_map=fm))
    fm.redraw()
    assert not torch.allclose(a, linear_attention(q, k, v, feature_map=fm))
    timed = FavorFeatures(32, seed=5, redraw_interval=1)
    first = linear_attention(q, k, v, feature_map=timed)
    assert not torch.allclose(first, linear_attention(q, k, v, feature_map=timed))  # training: redrawn
    timed.eval()
    frozen = linear_attention(q, k, v, feature_map=timed)
    assert torch.equal(frozen, linear_attention(q, k, v, feature_map=timed))


# The two FAVOR+ tests below are statistical (random features): they use fixed seeds so that a
# threshold on an estimator's error cannot flake; every other test draws fresh inputs.
def test_favor_error_falls_with_features():
    rows = favor_sweep(128, 32, [8, 64, 512], seed=11, heads=2, redraws=3)
    errs = [e for _, e in rows]
    assert [m for m, _ in rows] == [8, 64, 512]
    assert errs[0] > errs[1] > errs[2], rows
    assert errs[2] < 0.5 * errs[0], rows


def test_favor_approximates_softmax_causal():
    q, k, v, _ = make_inputs(torch.Generator().manual_seed(3), 1, 96, 2, 16, state=False, scale=0.5)
    err = memattn.ops.linear.linear_attention_error(q, k, v, causal=True, feature_map=FavorFeatures(2048, seed=1))
    err_elu = memattn.ops.linear.linear_attention_error(q, k, v, causal=True)
    assert err < 0.1 and err < err_elu


# ---------------------------------------------------------------- bad input

def _qkv(s=8, h=2, d=4):
    return torch.randn(1, s, h, d), torch.randn(1, s, h, d), torch.randn(1, s, h, d)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(chunk_size=0), ValueError, "chunk_size must be > 0, got 0"),
    (dict(chunk_size=-3), ValueError, "got -3"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (dict(feature_map="softmax"), ValueError, "unknown feature_map 'softmax'"),
    (dict(feature_map=3), TypeError, "feature_map must be a name or a callable"),
    (dict(feature_map=lambda x: x[..., :1].sum(-1)), ValueError, "feature_map must map"),
    (dict(form="scan"), ValueError, "unknown form 'scan'"),
    (dict(form="chunked"), ValueError, "causal form"),
    (dict(form="noncausal", causal=True), ValueError, "needs causal=False"),
    (dict(eps=-1.0), ValueError, "eps must be"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(initial_state=(torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, 4))), ValueError, "(1, 2, 4, 4), got (1, 2, 4, 5)"),
    (dict(initial_state=(torch.zeros(1, 2, 4, 4), torch.zeros(2, 4))), ValueError, "(1, 2, 4), got (2, 4)"),
    (dict(initial_state=torch.zeros(1, 2, 4, 4)), TypeError, "(kv, z) pair"),
])
def test_bad_input(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        linear_attention(*_qkv(), **kwargs)


def test_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="seqlen_q == seqlen_k, got 8 and 5"):
        linear_attention(q, k[:, :5], v[:, :5], causal=True)
    with pytest.raises(ValueError, match="4 dims"):
        linear_attention(q[0], k, v)
    dec = LinearAttentionState.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"\(batch, heads\) = \(1, 2\), got \(1, 3, 4\)"):
        dec.step(torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="D_phi = 4"):
        LinearAttentionState.zeros(1, 2, 4, 4, feature_map=lambda x: torch.cat([x, x], -1)).step(
            *(torch.randn(1, 2, 4) for _ in range(3)))
    with pytest.raises(ValueError, match="head_dim 4"):
        fm = FavorFeatures(8)
        linear_attention(*_qkv(d=4), feature_map=fm)
        linear_attention(*_qkv(d=6), feature_map=fm)
