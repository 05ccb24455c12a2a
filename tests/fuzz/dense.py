"""Dense-attention cases: ``memattn.attention`` (every method and tile backend), ``attention_varlen``,
``merge_attention`` and ``ring_attention`` on a world of one, against the float64 reference.

A case is a dict drawn by ``attention_cases``; ``build`` turns it into tensors and keyword arguments (the
same ones for ours and for the reference's dense mask and bias). Score options are rows of ``OPTIONS``:
adding one (e.g. ``sinks=``) is one ``Option`` row, its strategy and its effect on the reference.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from hypothesis import strategies as st

import memattn
from memattn import reference
from conftest import amax, attention_floors, cotangents, fa_floor, max_row_norm

from .contract import classify_error, compare, stored_p_floor, wrong, OK, Failure

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
LENGTHS = st.sampled_from([0, 1, 1, 2, 3, 5, 8, 13, 17, 33, 70])
HEAD_DIMS = st.one_of(st.sampled_from([1, 2, 3, 7, 8, 16, 31, 40, 59, 64]), st.sampled_from([111, 128, 256, 512]))
# Hostile values: where they go and what they are. "row" NaN/inf fill one whole query row of one head.
SPECIALS = st.sampled_from(["none"] * 6 + ["nan_q", "nan_q_row", "inf_q", "nan_k", "inf_k", "nan_v", "inf_v",
                                          "big", "tiny", "huge_v"])
MAGNITUDE = {"big": 60.0, "tiny": 1e-30}


@dataclass(frozen=True)
class Option:
    """One keyword of ``attention`` the fuzzer varies.

    draw: strategy of its case value (plain data); kwargs(case, value, dims) -> {name: argument} for ours;
    apply(case, value, dims, mask, bias) -> (mask, bias, ref_kwargs) folds it into the reference's dense mask
    (bool (B|1, H|1, Sq, Sk)) and float bias, or extra reference keywords. invalid: {perturbation: (argument
    values, names the error must mention)} it contributes to the invalid cases."""

    name: str
    draw: st.SearchStrategy
    kwargs: Callable
    apply: Callable


def _positions(sq, sk):
    i = torch.arange(sq).unsqueeze(1) + (sk - sq)
    j = torch.arange(sk).unsqueeze(0)
    return i, j


def _window_mask(case, value, dims, mask, bias):
    left, right = value
    if case["causal"]:
        right = 0 if right < 0 else min(right, 0)
    i, j = _positions(dims["sq"], dims["sk"])
    w = torch.ones(dims["sq"], dims["sk"], dtype=torch.bool)
    if left >= 0:
        w &= j >= i - left
    if right >= 0:
        w &= j <= i + right
    return mask & w, bias, {}


def _kpm(case, dims):
    if case["kpm"] is None:
        return None
    g = torch.Generator().manual_seed(case["kpm"])
    return torch.rand(dims["b"], dims["sk"], generator=g) > 0.3


def _kpm_apply(case, value, dims, mask, bias):
    kpm = _kpm(case, dims)
    return (mask if kpm is None else mask & kpm.view(dims["b"], 1, 1, dims["sk"])), bias, {}


def _dense_mask(case, dims):
    if case["dense_mask"] is None:
        return None
    g = torch.Generator().manual_seed(case["dense_mask"])
    return torch.rand(1, dims["h"], dims["sq"], dims["sk"], generator=g) > 0.4


def _alibi(case, dims):
    if not case["alibi"]:
        return None
    return torch.linspace(0.05, 1.0, dims["h"], dtype=torch.float32)


def _alibi_apply(case, value, dims, mask, bias):
    slopes = _alibi(case, dims)
    if slopes is None:
        return mask, bias, {}
    i, j = _positions(dims["sq"], dims["sk"])
    return mask, -slopes.view(1, -1, 1, 1) * (i - j).abs().to(torch.float32), {}


# sinks=: (seed, kind, float32 (else the input dtype), requires_grad); kind places one hostile logit
SINK_KINDS = ["normal"] * 5 + ["nan", "inf", "-inf", "big", "-big"]


def _sinks(case, dims):
    """The (H,) sink logits of a case (None if it draws none): at the scale of a row's lse (3 + 2 randn), so
    the sink takes a real share, with one NaN / +-inf / huge logit by kind; a leaf requiring grad if drawn so."""
    if case.get("sinks") is None:
        return None
    seed, kind, f32, grad = case["sinks"]
    g = torch.Generator().manual_seed(seed)
    t = 3.0 + 2.0 * torch.randn(dims["h"], generator=g, dtype=torch.float64)
    at = int(torch.randint(0, dims["h"], (1,), generator=g))
    if kind in ("nan", "inf", "-inf"):
        t[at] = float(kind)
    elif kind in ("big", "-big"):
        t = t * (3e4 if kind == "big" else -3e4)  # past float16's largest finite value, for some logits
    return t.to(torch.float32 if f32 else DTYPES[case["dtype"]]).requires_grad_(bool(grad))


OPTIONS = (
    Option("window_size", st.sampled_from([(-1, -1)] * 4 + [(0, 0), (1, 0), (3, 2), (-1, 0), (2, -1), (0, -1)]),
           lambda c, v, d: {"window_size": tuple(v)}, _window_mask),
    Option("key_padding_mask", st.one_of(st.none(), st.none(), st.integers(0, 2**16)),
           lambda c, v, d: {"key_padding_mask": _kpm(c, d)}, _kpm_apply),
    Option("mask", st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2**16)),
           lambda c, v, d: {"mask": _dense_mask(c, d)},
           lambda c, v, d, m, b: ((m if _dense_mask(c, d) is None else m & _dense_mask(c, d)), b, {})),
    Option("alibi", st.sampled_from([False, False, False, True]),
           lambda c, v, d: {"alibi_slopes": _alibi(c, d)}, _alibi_apply),
    Option("softcap", st.sampled_from([0.0, 0.0, 0.0, 5.0]),
           lambda c, v, d: {"softcap": v}, lambda c, v, d, m, b: (m, b, {"softcap": v})),
    Option("sinks", st.one_of(st.none(), st.none(), st.tuples(st.integers(0, 2**16), st.sampled_from(SINK_KINDS),
                                                              st.booleans(), st.booleans())),
           lambda c, v, d: {"sinks": _sinks(c, d)}, lambda c, v, d, m, b: (m, b, {"sinks": _sinks(c, d)})),
)
# Option name -> the case key it is stored under (window_size and mask keep their names)
KEYS = {"window_size": "window", "key_padding_mask": "kpm", "mask": "dense_mask", "alibi": "alibi",
        "softcap": "softcap", "sinks": "sinks"}

# Invalid perturbations: name -> the argument names its error may mention.
INVALID = {
    "k_dtype": ("k", "v", "q", "dtype"), "int_q": ("q", "dtype"), "heads": ("heads", "kv_heads", "q", "k"),
    "head_dim": ("head_dim", "v", "k"), "q_dims": ("q",), "batch": ("batch", "k", "q"),
    "seqlen_v": ("seqlen", "v", "k"), "block_size": ("block_size",), "method": ("method",),
    "softmax_scale": ("softmax_scale",), "window": ("window_size",), "kpm_shape": ("key_padding_mask",),
    "kpm_dtype": ("key_padding_mask",), "alibi_shape": ("alibi_slopes",), "causal_int": ("causal",),
    "softcap_neg": ("softcap",), "mask_shape": ("mask",), "q_list": ("q",), "sinks_shape": ("sinks",),
}


@st.composite
def attention_cases(draw, dtypes=tuple(DTYPES), invalid=tuple(INVALID), options=OPTIONS, block_sizes=None):
    hkv = draw(st.sampled_from([1, 1, 2, 3]))
    d = draw(HEAD_DIMS)
    case = {
        "b": draw(st.sampled_from([0, 1, 1, 2])), "sq": draw(LENGTHS), "sk": draw(LENGTHS),
        "hkv": hkv, "h": hkv * draw(st.sampled_from([1, 1, 2, 3])), "d": d,
        "dtype": draw(st.sampled_from(dtypes)), "seed": draw(st.integers(0, 2**31 - 1)),
        "layout": draw(st.sampled_from(["contiguous", "contiguous", "transposed", "expanded_kv", "sliced"])),
        "special": draw(SPECIALS), "causal": draw(st.booleans()),
        "grad": draw(st.sampled_from(["", "", "q", "kv", "qkv", "v"])),
        "return_lse": draw(st.booleans()),
        "block_size": draw(st.sampled_from(block_sizes or [None, None, 1, 3, 16, 64])),
        "invalid": draw(st.sampled_from(("",) * (2 * len(invalid) + 1) + tuple(invalid))),
    }
    if d > 128:  # large head dims with small lengths only (the case count, not the shape, is the point)
        case["sq"], case["sk"] = min(case["sq"], 5), min(case["sk"], 8)
    for o in options:
        case[KEYS.get(o.name, o.name)] = draw(o.draw)
    return case


def _tensor(shape, dtype, g, layout, expand_dims=()):
    """float64 randn of `shape` in `layout`, cast to dtype: contiguous, a transposed view (heads and seqlen
    swapped in memory), a slice of a wider tensor (non-unit strides), or expanded along `expand_dims`
    (stride 0)."""
    b, s, h, d = shape
    if layout == "transposed":
        return torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(b, s, h, 2 * d, generator=g, dtype=torch.float64).to(dtype)[..., ::2]
    if layout == "expanded_kv" and expand_dims:
        small = [1 if i in expand_dims else n for i, n in enumerate(shape)]
        return torch.randn(*small, generator=g, dtype=torch.float64).to(dtype).expand(*shape)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _place_special(case, q, k, v, g):
    """Hostile values in place (on fresh storage: expanded views are materialised first)."""
    sp = case["special"]
    if sp in MAGNITUDE:
        return q * MAGNITUDE[sp], k * MAGNITUDE[sp], v
    if sp == "huge_v":  # near float16's largest finite value: out stays finite, naive sums may not
        return q, k, v * (6e4 if v.dtype == torch.float16 else 1e30)
    which = {"q": 0, "k": 1, "v": 2}[sp.split("_")[1]]
    t = (q, k, v)[which].clone()
    if t.numel() == 0:
        return q, k, v
    val = float("nan") if sp.startswith("nan") else float("inf") * (1 if torch.rand(1, generator=g) < 0.5 else -1)
    b, s, h, d = (int(torch.randint(0, n, (1,), generator=g)) for n in t.shape)
    if sp.endswith("_row"):
        t[b, s, h, :] = val
    else:
        t[b, s, h, d] = val
    return tuple(t if i == which else x for i, x in enumerate((q, k, v)))


def _options_of(case):
    """The OPTIONS rows a case draws (an entry point without some keywords draws fewer)."""
    return [o for o in OPTIONS if KEYS.get(o.name, o.name) in case]


def build(case):
    """Tensors and keyword arguments of one case: (q, k, v, kwargs, dims). Inputs are leaves with
    requires_grad as the case says."""
    dt = DTYPES[case["dtype"]]
    g = torch.Generator().manual_seed(case["seed"])
    b, sq, sk, h, hkv, d = (case[n] for n in ("b", "sq", "sk", "h", "hkv", "d"))
    q = _tensor((b, sq, h, d), dt, g, case["layout"])
    k = _tensor((b, sk, hkv, d), dt, g, case["layout"], expand_dims=(0,) if b > 1 else (1,))
    v = _tensor((b, sk, hkv, d), dt, g, case["layout"], expand_dims=(0,) if b > 1 else (1,))
    if case["special"] != "none":
        q, k, v = _place_special(case, q, k, v, g)
    dims = dict(b=b, sq=sq, sk=sk, h=h, hkv=hkv, d=d)
    kwargs = {"causal": case["causal"], "return_lse": case["return_lse"]}
    for o in _options_of(case):
        kwargs.update(o.kwargs(case, case[KEYS.get(o.name, o.name)], dims))
    return q, k, v, kwargs, dims


def reference_of(case, q, k, v, dims, dtype=torch.float64, leaves=None):
    """The reference in `dtype` (float64: the oracle; q's dtype: naive_T), out and lse, differentiable.
    An option's tensor that requires grad (sinks) becomes a fresh leaf here, float64 for the oracle (its own
    dtype for naive_T), stored in `leaves` under its keyword."""
    mask = torch.ones(1, 1, dims["sq"], dims["sk"], dtype=torch.bool)
    bias, extra = None, {}
    if case["causal"] and case.get("window", (-1, -1)) == (-1, -1):  # causal alone: window_size's rule, (-1, 0)
        mask, bias, _ = _window_mask(case, (-1, 0), dims, mask, bias)
    for o in _options_of(case):
        mask, bias, more = o.apply(case, case[KEYS.get(o.name, o.name)], dims, mask, bias)
        extra.update(more)
    for name, t in extra.items():
        if torch.is_tensor(t) and t.requires_grad:
            extra[name] = t.detach().to(torch.float64 if dtype == torch.float64 else t.dtype).requires_grad_()
            if leaves is not None:
                leaves[name] = extra[name]
    return reference.attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=mask, bias=bias,
                               return_lse=True, **extra)


def corrupt(case, q, k, v, kwargs, dims):
    """Apply the case's invalid perturbation: returns (q, k, v, kwargs, method override or None)."""
    bad, method = case["invalid"], None
    if bad == "k_dtype":
        k = k.to(torch.float64 if k.dtype != torch.float64 else torch.float32)
    elif bad == "int_q":
        q, k, v = (x.detach().to(torch.int32) for x in (q, k, v))
    elif bad == "heads":
        k = torch.randn(dims["b"], dims["sk"], dims["h"] + 1, dims["d"]).to(q.dtype)
        v = k.clone()
    elif bad == "head_dim":
        v = torch.randn(dims["b"], dims["sk"], dims["hkv"], dims["d"] + 1).to(q.dtype)
    elif bad == "q_dims":
        q = q.detach().reshape(-1, dims["h"], dims["d"])
    elif bad == "batch":
        k = torch.randn(dims["b"] + 1, dims["sk"], dims["hkv"], dims["d"]).to(q.dtype)
    elif bad == "seqlen_v":
        v = torch.randn(dims["b"], dims["sk"] + 1, dims["hkv"], dims["d"]).to(q.dtype)
    elif bad == "block_size":
        kwargs["block_size"] = 0 if dims["d"] % 2 else -3
    elif bad == "method":
        method = "fastest"
    elif bad == "softmax_scale":
        kwargs["softmax_scale"] = "0.1"
    elif bad == "window":
        kwargs["window_size"] = (-2, 0) if dims["d"] % 2 else (3,)
    elif bad == "kpm_shape":
        kwargs["key_padding_mask"] = torch.ones(dims["b"], dims["sk"] + 1, dtype=torch.bool)
    elif bad == "kpm_dtype":
        kwargs["key_padding_mask"] = torch.ones(dims["b"], dims["sk"])
    elif bad == "alibi_shape":
        kwargs["alibi_slopes"] = torch.ones(dims["h"] + 1)
    elif bad == "causal_int":
        kwargs["causal"] = 1
    elif bad == "softcap_neg":
        kwargs["softcap"] = -1.0
    elif bad == "mask_shape":
        kwargs["mask"] = torch.ones(dims["sq"] + 1, dims["sk"] + 2, dtype=torch.bool)
    elif bad == "q_list":
        q = [[1.0]]
    elif bad == "sinks_shape":
        kwargs["sinks"] = torch.zeros(dims["h"] + 1) if dims["d"] % 2 else torch.zeros(1, dims["h"])
    return q, k, v, kwargs, method


def _leaves(case, q, k, v):
    """The inputs as leaves for ours and naive_T (the same tensors: layouts kept, expanded views included) and
    for the oracle (float64 copies), and the indices of those that require grad."""
    picked = [i for i, n in enumerate("qkv") if n in case["grad"] and (q, k, v)[i].is_floating_point()]
    ours = [t.detach().requires_grad_(i in picked) for i, t in enumerate((q, k, v))]
    hi = [t.detach().double().requires_grad_(i in picked) for i, t in enumerate((q, k, v))]
    return ours, hi, ours, picked


def run_attention(case, call, materialised=False, allowed_named=()):
    """The contract of one dense case; call(q, k, v, kwargs, method) runs ours and returns (out, lse).
    materialised: ours stores its scores in q's dtype (see ``_floors``)."""
    q, k, v, kwargs, dims = build(case)
    if case["invalid"]:
        q, k, v, kwargs, method = corrupt(case, q, k, v, kwargs, dims)
        try:
            call(q, k, v, kwargs, method)
        except Exception as e:  # noqa: BLE001 -- classified below
            kind, msg = classify_error(e, INVALID[case["invalid"]], allowed_named)
            if kind != OK:
                raise Failure(kind, msg) from None
            return
        wrong(f"invalid input ({case['invalid']}) was accepted")
    ours_in, hi, lo, picked = _leaves(case, q, k, v)
    if case["block_size"] is not None:
        kwargs["block_size"] = case["block_size"]
    try:
        out = call(*ours_in, kwargs, None)
    except Exception as e:  # noqa: BLE001
        kind, msg = classify_error(e, None)
        raise Failure(kind, msg) from None
    opt64, opt_t = {}, {}
    ref64 = reference_of(case, *hi, dims, leaves=opt64)
    naive = reference_of(case, *lo, dims, dtype=q.dtype, leaves=opt_t)
    opts = [(n, kwargs[n], opt64[n], opt_t[n]) for n in opt64]  # (name, ours, oracle's, naive's) leaves
    _check_grads_and_out(case, out, ref64, naive, ours_in, hi, lo, picked, dims, materialised, opts)


def _max_score(case, q, k, dims) -> float:
    """A bound on |score|: scale |q_i| |k_j| (Cauchy-Schwarz), at most softcap when capped, plus the largest
    ALiBi bias."""
    s = dims["d"] ** -0.5 * max_row_norm(q) * max_row_norm(k)
    if case.get("softcap"):
        s = min(s, case["softcap"])
    if case.get("alibi") and dims["sq"] and dims["sk"]:
        s += max(dims["sq"], dims["sk"])
    return s


def _score_rounding(case, q, k, dims) -> float:
    """The largest error of a score stored in q's dtype: u(T) * max|score| (0 in float64)."""
    return (torch.finfo(q.dtype).eps / 2 if q.dtype != torch.float64 else 0.0) * _max_score(case, q, k, dims)


def _floors(case, q, k, v, dims, dout=None, materialised=False):
    """attention_floors, plus for a path that stores its scores in q's dtype (standard, checkpoint) their
    rounding d carried through the softmax: lse by d, out by 2 Mv d, the gradients as ``attention_floors``'
    "*_alone" entries carry the lse floor (P moves by a relative 2 d)."""
    f = attention_floors(q, k, v, dout, keys=max(1, dims["sk"]))
    if not materialised:  # flash-style tiles (the fused CPU kernel) store P in q's dtype
        f["out"] += stored_p_floor(q.dtype, v)
    if dout is not None and not materialised:
        # a flash backward recomputes P = exp(s - lse) from the lse it saved in float32 (float64 for float64):
        # lse rounded there moves every P of the row by a relative u * |lse| (|lse| <= max|score| + log Sk),
        # which the naive backward (P from its softmax) does not see; carried as attention_floors carries
        # its lse floor into the "*_alone" entries
        u = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).eps / 2
        d = u * (_max_score(case, q, k, dims) + math.log(max(2, dims["sk"])))
        base = attention_floors(q, k, v, dout, keys=max(1, dims["sk"]))
        for g in ("dq", "dk", "dv"):
            f[g] += (base[g + "_alone"] - base[g]) * (d / base["lse"] if base["lse"] else 0.0)
    if materialised:
        d = _score_rounding(case, q, k, dims)
        base = attention_floors(q, k, v, dout, keys=max(1, dims["sk"]))
        f["lse"] += d
        f["out"] += 2 * amax(v) * d
        if dout is not None:
            for g in ("dq", "dk", "dv"):  # the alone terms scale with the lse floor: rescale them to d
                extra = base[g + "_alone"] - base[g]
                f[g] += extra * (d / base["lse"] if base["lse"] else 0.0)
    return f


def _check_grads_and_out(case, out, ref64, naive, ours_in, hi, lo, picked, dims, materialised=False, opts=()):
    """opts: (name, ours, oracle's, naive's) leaves of the options whose gradients are compared too (sinks)."""
    q, k, v = (t.detach() for t in ours_in)
    floors = _floors(case, q, k, v, dims, materialised=materialised)
    inf_in = case["special"].startswith("inf")
    compare("out", out[0], ref64[0], naive[0], floor=floors["out"], inf_may_be_nan=inf_in)
    if out[1] is not None:
        compare("lse", out[1], ref64[1], naive[1].to(out[1].dtype) if naive[1] is not None else None,
                floor=floors["lse"], lse=True, inf_may_be_nan=inf_in)
    undefined_sink = case.get("sinks") is not None and case["sinks"][1] in ("nan", "inf")
    if not (picked or opts) or case["special"] not in ("none", "big", "tiny", "nan_q", "nan_q_row") or undefined_sink:
        return  # gradients through inf/NaN keys and values, or a NaN/+inf sink (every row of its head is NaN):
        # no pattern the tiled paths must reproduce
    dout = cotangents([ref64[0]], seed=case["seed"] % 1000)[0]
    names = ["dq", "dk", "dv"] + ["d" + o[0] for o in opts]
    wrt = [[ours_in[i] for i in picked] + [o[1] for o in opts], [hi[i] for i in picked] + [o[2] for o in opts],
           [lo[i] for i in picked] + [o[3] for o in opts]]
    g_ours = torch.autograd.grad(out[0], wrt[0], dout.to(out[0].dtype), allow_unused=True)
    g64 = torch.autograd.grad(ref64[0], wrt[1], dout, allow_unused=True)
    gt = torch.autograd.grad(naive[0], wrt[2], dout.to(naive[0].dtype), allow_unused=True)
    fl = _floors(case, q, k, v, dims, dout, materialised=materialised)
    # d sink_h = sum over the head's rows of p_sink (-dO . O'): b * Sq rows of a D-term product, each at most
    # Ndo * Nv (O' is a sub-average of the values)
    fl["dsinks"] = fa_floor(q.dtype, max_row_norm(dout) * max_row_norm(v), max(1, dims["b"] * dims["sq"]) * dims["d"])
    nan_rows = case["special"] in ("nan_q", "nan_q_row")
    # a -inf or huge logit: whether a product with it shows as NaN or inf depends on the order of the sums
    bad_sink = case.get("sinks") is not None and case["sinks"][1] in ("-inf", "big", "-big")
    for j, (x, a, r, n) in enumerate(zip(wrt[0], g_ours, g64, gt)):
        i = picked[j] if j < len(picked) else 3
        a = torch.zeros_like(x) if a is None else a
        r = torch.zeros_like(x, dtype=torch.float64) if r is None else r
        n = torch.zeros_like(x) if n is None else n
        compare(names[i if i < 3 else 3 + j - len(picked)], a, r, n, floor=fl[names[i] if i < 3 else "dsinks"],
                factor=3.0, nan_only_pattern=(nan_rows and i == 0) or bad_sink,
                within_pattern=nan_rows and i > 0 and not bad_sink)


def attention_call(method, backend=None):
    """call(q, k, v, kwargs, method override) for ``memattn.attention`` with `method` (and tile `backend`)."""
    def call(q, k, v, kwargs, override):
        ctx = memattn.use_backend(backend) if backend else contextlib.nullcontext()
        with ctx:
            res = memattn.attention(q, k, v, method=override or method, **kwargs)
        return res if isinstance(res, tuple) else (res, None)
    return call
