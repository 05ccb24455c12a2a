"""Triton kernels against the float64 oracle (FlashAttention's tolerance rule).

Without CUDA the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before
triton is imported) on CPU tensors, with tiny shapes: the interpreter executes every program with
numpy. With CUDA (and the interpreter not asked for) the same tests run compiled on cuda tensors.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton", reason="triton is not installed (pip install 'memattn[gpu]')")

import memattn  # noqa: E402
from memattn import kernels, reference  # noqa: E402
from memattn.kernels import triton as tk  # noqa: E402
from memattn.ops.blockwise import blockwise_attention  # noqa: E402
from memattn.ops.spec import build_spec  # noqa: E402
from memattn.kernels.paged_decode import visible_ranges  # noqa: E402
from memattn.ops.paged import paged_attention_reference  # noqa: E402

from conftest import amax, assert_fa_rule, attention_floors, cotangents  # noqa: E402


def _device_param(name):
    if name == "cpu":
        skip = not tk.interpreting()
        why = "the interpreter is off (CUDA present); run with TRITON_INTERPRET=1 for CPU tensors"
    else:
        skip = not torch.cuda.is_available() or tk.interpreting()
        why = "no CUDA device" if not torch.cuda.is_available() else "TRITON_INTERPRET=1 runs CPU tensors only"
    return pytest.param(name, marks=pytest.mark.skipif(skip, reason=why), id=name)


DEVICES = [_device_param("cpu"), _device_param("cuda")]


def _grads(outputs, inputs, seed=123):
    """Gradients of sum(out * cot) with seeded cotangents (made on CPU, moved to each output's device)."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        cot = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
        loss = loss + (torch.where(torch.isinf(o), torch.zeros_like(o), o) * cot).sum()
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs))


def _inputs(seed, b, tq, tk_, h, hkv, d, dtype, device):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, n, d, generator=g, dtype=torch.float64).to(dtype)
               for s, n in ((tq, h), (tk_, hkv), (tk_, hkv)))
    high = [t.double().requires_grad_(True) for t in (q, k, v)]
    naive = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ours = [t.to(device).requires_grad_(True) for t in (q, k, v)]
    return high, naive, ours


# (dtype, tq, tk, H, Hkv, D, variant): GQA 4:2 / 4:1 / MHA, head dims 16 and 40, awkward lengths.
TILE_CASES = [
    (torch.float32, 17, 33, 4, 2, 40, "plain"),
    (torch.float16, 17, 33, 4, 1, 16, "mask+bias"),
    (torch.float32, 33, 33, 4, 4, 16, "causal"),
    (torch.float16, 33, 33, 4, 2, 40, "causal+softcap"),
    (torch.float32, 1, 17, 4, 2, 40, "softcap+bias"),
    (torch.bfloat16, 17, 17, 2, 1, 16, "mask"),
    (torch.float32, 17, 1, 2, 1, 16, "plain"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tq,tkk,h,hkv,d,variant", TILE_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_tile_matches_oracle(device, dtype, tq, tkk, h, hkv, d, variant, seed):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter (numpy) has no bfloat16: its loads come back garbled; bf16 runs on CUDA")
    (q64, k64, v64), (qn, kn, vn), (q, k, v) = _inputs(seed, 2, tq, tkk, h, hkv, d, dtype, device)
    g = torch.Generator().manual_seed(seed + 1)
    mask = bias = None
    softcap = 4.0 if "softcap" in variant else 0.0
    causal = "causal" in variant
    if "mask" in variant:
        mask = torch.rand(tq, tkk, generator=g) > 0.4
        mask[min(3, tq - 1)] = False  # a row with no visible key
    if "bias" in variant:
        bias = torch.randn(1, h, tq, tkk, generator=g)
    dense = mask
    if causal:
        tri = torch.ones(tq, tkk, dtype=torch.bool).tril()
        dense = tri if dense is None else dense & tri
    scale = d ** -0.5
    ref = reference.attention(q64, k64, v64, mask=dense, bias=bias, softmax_scale=scale, softcap=softcap,
                              return_lse=True)
    nai = reference.attention(qn, kn, vn, mask=dense, bias=bias, softmax_scale=scale, softcap=softcap,
                              return_lse=True)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    kw = dict(scale=scale, mask=dev(mask), bias=dev(bias), softcap=softcap, causal=causal)
    with torch.no_grad():
        out, lse = tk.tile_forward(q, k, v, **kw)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    floor = attention_floors(qn, kn, vn, cot.to(dtype), scale=scale, bias=bias)
    assert_fa_rule("out", out.cpu(), ref[0], nai[0], floor=floor["out"], seed=seed)
    assert_fa_rule("lse", lse.cpu(), ref[1], nai[1], floor=floor["lse"], seed=seed)
    if mask is not None:
        row = min(3, tq - 1)
        assert (out[:, row] == 0).all() and torch.isneginf(lse[:, :, row]).all()
    # backward: the tile is the whole problem, so its lse is the global lse
    dout = cot.to(dtype).to(device)
    delta = (dout.float() * out).sum(-1).transpose(1, 2)
    dq, dk, dv = tk.tile_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, delta, **kw)
    rg = torch.autograd.grad((ref[0] * cot.to(dtype).double()).sum(), (q64, k64, v64))
    ng = torch.autograd.grad((nai[0] * cot.to(dtype)).sum(), (qn, kn, vn))
    for name, ours, r, n in zip("qkv", (dq, dk, dv), rg, ng):
        assert not ours.isnan().any()
        assert_fa_rule(f"d{name}", ours.cpu(), r, n, factor=3.0, floor=floor[f"d{name}"], seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_blockwise_schedule_drives_triton_tiles(device, seed):
    """End to end: the unchanged blockwise schedule (window layout: empty, full, causal-diagonal and
    masked tiles; bands; merges) with the Triton tile, forward and backward through lse."""
    (q64, k64, v64), (qn, kn, vn), (q, k, v) = _inputs(seed, 1, 45, 45, 4, 2, 40, torch.float32, device)
    spec = build_spec(q.shape, k.shape[1], causal=True, softmax_scale=None, key_padding_mask=None, window_size=(20, 0))
    dense = spec.mask.dense(45, 45)
    out, lse = blockwise_attention(q, k, v, spec, 16, 16, impl="triton")
    ref = reference.attention(q64, k64, v64, mask=dense, return_lse=True)
    nai = reference.attention(qn, kn, vn, mask=dense, return_lse=True)
    floor = attention_floors(qn, kn, vn, *cotangents(list(nai)))  # the cotangents _grads draws
    assert_fa_rule("out", out.detach().cpu(), ref[0], nai[0], floor=floor["out"], seed=seed)
    assert_fa_rule("lse", lse.detach().cpu(), ref[1], nai[1], floor=floor["lse"], seed=seed)
    for name, g, rg, ng in zip("qkv", _grads([out, lse], (q, k, v)), _grads(list(ref), (q64, k64, v64)),
                               _grads(list(nai), (qn, kn, vn))):
        assert_fa_rule(f"d{name}", g.cpu(), rg, ng, factor=3.0, floor=floor[f"d{name}"], seed=seed)


@pytest.fixture
def force_triton():
    """Route every public entry point to the Triton tiles and decode kernel, as CUDA tensors are routed."""
    with kernels.use_backend("triton", decode="triton"):
        yield


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_with_triton_tiles(device, seed, force_triton):
    """Packed sequences (Problems of the schedule), GQA 4:2, ALiBi bias, causal."""
    g = torch.Generator().manual_seed(seed)
    lens = [5, 0, 19]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    q = torch.randn(24, 4, 16, generator=g)
    k, v = torch.randn(24, 2, 16, generator=g), torch.randn(24, 2, 16, generator=g)
    slopes = torch.rand(4, generator=g)
    out = memattn.attention_varlen(q.to(device), k.to(device), v.to(device), cu.to(device), cu.to(device), 19, 19,
                                   causal=True, alibi_slopes=slopes.to(device), )
    floor = attention_floors(q, k, v, bias=amax(slopes) * max(lens), keys=max(lens))["out"]
    for i, n in enumerate(lens):
        if not n:
            continue
        s = slice(int(cu[i]), int(cu[i + 1]))
        qi, ki, vi = q[s][None], k[s][None], v[s][None]
        spec = build_spec(qi.shape, ki.shape[1], causal=True, softmax_scale=None, key_padding_mask=None, alibi_slopes=slopes)
        args = dict(mask=spec.mask.dense(n, n), bias=spec.dense_bias(n, n))
        ref = reference.attention(qi.double(), ki.double(), vi.double(), **args)
        assert_fa_rule(f"seq {i}", out[s].cpu()[None], ref, reference.attention(qi, ki, vi, **args), floor=floor,
                       seed=seed)


def _paged_case(seed, dtype, device, lens, h=4, hkv=2, d=40, page=16, blocks=24):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(blocks, page, hkv, d, generator=g).to(dtype)
    vc = torch.randn(blocks, page, hkv, d, generator=g).to(dtype)
    per = -(-max(lens) // page)
    table = torch.randperm(blocks, generator=g)[:len(lens) * per].reshape(len(lens), per).to(torch.int32)
    return kc.to(device), vc.to(device), table.to(device), torch.tensor(lens, dtype=torch.int32, device=device), \
        (kc, vc, table, torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,opts", [(torch.float32, {}), (torch.float16, {"window_size": (20, -1)}),
                                        (torch.float32, {"softcap": 3.0, "alibi": True})],
                         ids=["fp32", "fp16-window", "fp32-softcap-alibi"])
def test_paged_decode_kernel(device, dtype, opts, seed):
    """The split-K decode kernel through a permuted block table, against the gather reference."""
    lens = [1, 50, 96, 17]
    kc, vc, table, cl, (kc0, vc0, table0, cl0) = _paged_case(seed, dtype, device, lens)
    g = torch.Generator().manual_seed(seed + 1)
    q0 = torch.randn(len(lens), 1, 4, 40, generator=g).to(dtype)
    kw = {"window_size": opts.get("window_size", (-1, -1)), "softcap": opts.get("softcap", 0.0),
          "alibi_slopes": torch.rand(len(lens), 4, generator=g) if opts.get("alibi") else None}
    ranges = visible_ranges(cl, kw["window_size"][0])
    slopes = None if kw["alibi_slopes"] is None else kw["alibi_slopes"].to(device)
    out, lse = tk.paged_decode(q0[:, 0].to(device), kc, vc, table, ranges, scale=40 ** -0.5, softcap=kw["softcap"],
                               alibi_slopes=slopes)
    out, lse = out.unsqueeze(1), lse.unsqueeze(2)  # the reference's (B, 1, H, D), (B, H, 1)
    ref = paged_attention_reference(q0.double(), kc0.double(), vc0.double(), table0, cl0, return_lse=True, **kw)
    nai = paged_attention_reference(q0, kc0, vc0, table0, cl0, return_lse=True, **kw)
    alibi = 0.0 if kw["alibi_slopes"] is None else amax(kw["alibi_slopes"]) * max(lens)
    floor = attention_floors(q0, kc0, vc0, scale=40 ** -0.5, bias=alibi, keys=max(lens))
    assert_fa_rule("out", out.cpu(), ref[0], nai[0], floor=floor["out"], seed=seed)
    assert_fa_rule("lse", lse.cpu(), ref[1], nai[1], floor=floor["lse"], seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_public_api_with_triton(device, seed, force_triton):
    """paged_attention: decode rows go to the Triton decode kernel, prefill rows to the Triton tiles."""
    lens = [33, 40, 9]
    kc, vc, table, cl, (kc0, vc0, table0, cl0) = _paged_case(seed, torch.float32, device, lens)
    q_lens = [1, 18, 1]
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 4, 40, generator=torch.Generator().manual_seed(seed))
    out = memattn.paged_attention(q.to(device), kc, vc, table, cl, cu_seqlens_q=cu.to(device))
    ref = paged_attention_reference(q.double(), kc0.double(), vc0.double(), table0, cl0, cu_seqlens_q=cu)
    floor = attention_floors(q, kc0, vc0, keys=max(lens))["out"]
    assert_fa_rule("out", out.cpu(), ref, paged_attention_reference(q, kc0, vc0, table0, cl0, cu_seqlens_q=cu),
                   floor=floor, seed=seed)


def test_triton_selection():
    """By name only on CPU tensors (under the interpreter); the record refuses float64 with its reason."""
    q = torch.randn(1, 4, 2, 16)
    assert kernels.select(q, impl="triton") is kernels.triton_tiles() or not tk.interpreting()
    if tk.interpreting():
        with pytest.raises(ValueError, match="triton tile backend cannot run .*dtype torch.float64"):
            kernels.select(q.double(), impl="triton")
    assert kernels.choose(q).name == "cpu_flash"  # CPU tensors keep the CPU paths unless asked
