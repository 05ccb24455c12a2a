"""Cases of the entry points beyond ``memattn.attention``: packed and paged attention, merging, linear
attention and its decode state, ring attention on a world of one, the caches and the block manager, mask
objects and ``memattn masks show`` specs, ``memattn.memory.estimate``, the CLI's argument parsing,
``SamplingParams`` / ``LLM.add_request`` and the GGUF loader on truncated and corrupted files.

Paged variants are rows of ``PAGED_VARIANTS`` (entry name, forced decode kernel, cache options): a KV
storage format is one more row (see ``paged_cache``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
import tempfile

import torch
from hypothesis import strategies as st

import memattn
from memattn import reference
from conftest import amax, attention_floors, linear_floors

from . import dense
from .contract import OK, Failure, classify_error, compare, stored_p_floor, wrong

DT = dense.DTYPES


def expect_error(fn, names, allowed=(), allowed_named=()):
    """Run fn(); it must raise a ValueError/TypeError from memattn naming one of `names` (or one of the
    `allowed` exception types, documented by the entry point; or one of `allowed_named` naming one of them,
    e.g. ring attention's RingError, raised on every rank for one rank's bad input)."""
    try:
        fn()
    except allowed:
        return
    except Exception as e:  # noqa: BLE001 -- classified
        kind, msg = classify_error(e, names, allowed_named)
        if kind != OK:
            raise Failure(kind, msg) from None
        return
    wrong(f"invalid input accepted (expected an error naming one of {list(names)})")


def must_run(fn, allowed=()):
    """Run fn() on a valid input: any error is a failure (unclear if it did not come from our validation)."""
    try:
        return fn()
    except allowed:
        return None
    except Exception as e:  # noqa: BLE001
        kind, msg = classify_error(e, None)
        raise Failure(kind, msg) from None


def either(fn, names, allowed=()):
    """fn() may succeed (returns its result) or raise a clear error naming one of `names` (returns None)."""
    try:
        return fn()
    except allowed:
        return None
    except Exception as e:  # noqa: BLE001
        kind, msg = classify_error(e, names)
        if kind != OK:
            raise Failure(kind, msg) from None
        return None


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _window_mask(lq, lk, causal, window):
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(lq).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk).unsqueeze(0)
    m = torch.ones(lq, lk, dtype=torch.bool)
    if left >= 0:
        m &= j >= i - left
    if right >= 0:
        m &= j <= i + right
    return m, (i - j).abs().to(torch.float32)


# ------------------------------------------------------------------------------------------ attention_varlen

DOCS = st.lists(st.sampled_from([0, 0, 1, 2, 3, 5, 9, 17]), min_size=1, max_size=4)
VARLEN_INVALID = {"cu_start": ("cu_seqlens_q",), "cu_decreasing": ("cu_seqlens_k",), "cu_total": ("cu_seqlens_q",),
                  "max_seqlen": ("max_seqlen_q",), "cu_float": ("cu_seqlens_k",), "cu_batch": ("cu_seqlens_k",),
                  "q_dims": ("q",), "alibi_shape": ("alibi_slopes",)}


@st.composite
def varlen_cases(draw):
    hkv = draw(st.sampled_from([1, 2]))
    lq = draw(DOCS)
    lk = [draw(st.sampled_from([0, 1, 2, 3, 5, 9, 17])) for _ in lq]
    return {"lq": lq, "lk": lk, "hkv": hkv, "h": hkv * draw(st.sampled_from([1, 3])),
            "d": draw(st.sampled_from([1, 3, 8, 16, 59])), "dtype": draw(st.sampled_from(list(DT))),
            "causal": draw(st.booleans()), "window": draw(st.sampled_from([(-1, -1), (-1, -1), (2, 0), (1, 1)])),
            "alibi": draw(st.sampled_from(["", "", "heads", "batch"])), "softcap": draw(st.sampled_from([0.0, 0.0, 4.0])),
            "cu64": draw(st.sampled_from([False, False, False, True])), "seed": draw(st.integers(0, 2**31 - 1)),
            "special": draw(st.sampled_from(["none"] * 4 + ["nan_q", "nan_k"])),
            "invalid": draw(st.sampled_from([""] * 12 + list(VARLEN_INVALID)))}


def check_varlen(case):
    dt = DT[case["dtype"]]
    lq, lk, h, hkv, d = case["lq"], case["lk"], case["h"], case["hkv"], case["d"]
    q = _randn((sum(lq), h, d), dt, case["seed"])
    k = _randn((sum(lk), hkv, d), dt, case["seed"] + 1)
    v = _randn((sum(lk), hkv, d), dt, case["seed"] + 2)
    if case["special"] == "nan_q" and q.numel():
        q[len(q) // 2, 0, 0] = float("nan")
    if case["special"] == "nan_k" and k.numel():
        k[len(k) // 2, 0, 0] = float("nan")
    cut = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32)  # noqa: E731
    cq, ck = cut(lq), cut(lk)
    nb = len(lq)
    slopes = None
    if case["alibi"]:
        slopes = torch.linspace(0.1, 1, h) if case["alibi"] == "heads" else torch.rand(nb, h) + 0.1
    kw = dict(causal=case["causal"], window_size=case["window"], alibi_slopes=slopes, softcap=case["softcap"],
              return_lse=True)
    mq, mk = max(lq), max(lk)
    bad = case["invalid"]
    if bad:
        if bad == "cu_start":
            cq = cq + 1
        elif bad == "cu_decreasing":
            ck = torch.tensor([0, 3, 1, sum(lk)], dtype=torch.int32) if sum(lk) >= 3 else torch.tensor([0, -1], dtype=torch.int32)
            ck = ck if len(ck) == nb + 1 else torch.cat([ck[:1], ck[1:2] - 5, ck[2:]]) if len(ck) > 2 else ck
        elif bad == "cu_total":
            cq = cq.clone()
            cq[-1] += 1
        elif bad == "max_seqlen":
            mq = -1
        elif bad == "cu_float":
            ck = ck.float()
        elif bad == "cu_batch":
            ck = torch.cat([ck, ck[-1:]])
        elif bad == "q_dims":
            q = q.unsqueeze(0)
        elif bad == "alibi_shape":
            kw["alibi_slopes"] = torch.ones(nb + 1, h + 1)
        expect_error(lambda: memattn.attention_varlen(q, k, v, cq, ck, mq, mk, **kw), VARLEN_INVALID[bad])
        return
    if case["cu64"]:  # int64 offsets: either taken or refused by name, never misread
        res = either(lambda: memattn.attention_varlen(q, k, v, cq.long(), ck.long(), mq, mk, **kw),
                     ("cu_seqlens_q", "cu_seqlens_k"))
        if res is None:
            return
    else:
        res = must_run(lambda: memattn.attention_varlen(q, k, v, cq, ck, mq, mk, **kw))
    out, lse = res
    ref_o = torch.zeros(q.shape, dtype=torch.float64)
    ref_l = torch.full((h, q.shape[0]), float("-inf"), dtype=torch.float64)
    nai_o, nai_l = torch.zeros(q.shape, dtype=dt), torch.full((h, q.shape[0]), float("-inf"), dtype=dt)
    for i in range(nb):
        a, b_ = int(cq[i]), int(cq[i + 1])
        c, e = int(ck[i]), int(ck[i + 1])
        if b_ == a:
            continue
        m, dist = _window_mask(b_ - a, e - c, case["causal"], case["window"])
        bias = None
        if slopes is not None:
            s = slopes if slopes.dim() == 1 else slopes[i]
            bias = -s.view(1, -1, 1, 1) * dist
        for store_o, store_l, t in ((ref_o, ref_l, torch.float64), (nai_o, nai_l, dt)):
            o, l_ = reference.attention(q[a:b_].unsqueeze(0).to(t), k[c:e].unsqueeze(0).to(t), v[c:e].unsqueeze(0).to(t),
                                        mask=m, bias=bias, softcap=case["softcap"], return_lse=True)
            store_o[a:b_], store_l[:, a:b_] = o[0], l_[0]
    fl = attention_floors(q, k, v, keys=max(1, max(lk)))
    compare("out", out, ref_o, nai_o, floor=fl["out"])
    compare("lse", lse, ref_l, nai_l.to(lse.dtype), floor=fl["lse"], lse=True)


# ------------------------------------------------------------------------------------------ paged_attention

PAGED_INVALID = {"negative_id": ("block_table",), "id_out_of_range": ("block_table",),
                 "ctx_past_table": ("cache_seqlens", "block_table"), "ctx_negative": ("cache_seqlens",),
                 "q_longer_than_ctx": ("cache_seqlens", "q", "cu_seqlens_q"), "table_int64": ("block_table",),
                 "ctx_int64": ("cache_seqlens",), "cache_dtype": ("key_cache", "value_cache", "q"),
                 "cache_heads": ("key_cache", "heads", "kv_heads", "q", "value_cache"), "sinks_shape": ("sinks",),
                 "sinks_dtype": ("sinks",)}
# (entry name, forced decode kernel, the cache dtypes it reads, whether it applies ALiBi/softcap, extra cache
# options); prefill rows (2+ queries) always run the tile primitive, decode rows the forced kernel.
PAGED_VARIANTS = (
    ("paged_attention[native]", "native", ("float32", "bfloat16", "float16"), True, {}),
    ("paged_attention[pool]", "pool", tuple(DT), False, {}),
    ("paged_attention[gather]", "gather", tuple(DT), True, {}),
    ("paged_attention[triton]", "triton", ("float32", "float16"), True, {}),
    # KV storage formats: PagedKVCache(..., kv_dtype=) pages, held to the FA rule against the float64
    # reference on the dequantized cache (quantization error is the formats' own tests' business)
    ("paged_attention[native/int8]", "native", ("float32", "bfloat16", "float16"), True, {"kv_dtype": "int8"}),
    ("paged_attention[native/fp8_e4m3]", "native", ("float32", "bfloat16", "float16"), True,
     {"kv_dtype": "fp8_e4m3"}),
    ("paged_attention[native/int4]", "native", ("float32", "bfloat16", "float16"), True, {"kv_dtype": "int4"}),
    ("paged_attention[native/int2]", "native", ("float32", "bfloat16", "float16"), True, {"kv_dtype": "int2"}),
    ("paged_attention[gather/int8]", "gather", ("float32", "bfloat16", "float16"), True, {"kv_dtype": "int8"}),
    ("paged_attention[gather/int4]", "gather", ("float32", "bfloat16", "float16"), True, {"kv_dtype": "int4"}),
)
PAGED_SINKS = [None, None, "normal", "normal", "nan", "inf", "-inf"]


@st.composite
def paged_cases(draw, dtypes=tuple(DT), scores=True, head_dims=(1, 4, 16, 59, 64)):
    """scores: draw ALiBi and softcap too (a forced decode kernel without them refuses such calls).
    head_dims: a packed KV format takes multiples of its codes per byte only."""
    b = draw(st.sampled_from([0, 1, 2, 3]))
    ctx = [draw(st.sampled_from([0, 1, 2, 5, 16, 17, 40])) for _ in range(b)]
    decode = draw(st.booleans())
    lq = [min(c, 1) if decode else draw(st.integers(0, c)) for c in ctx]
    hkv = draw(st.sampled_from([1, 2]))
    return {"ctx": ctx, "lq": lq, "block_size": draw(st.sampled_from([1, 3, 4, 16])),
            "extra_blocks": draw(st.integers(0, 6)), "repeat_ids": draw(st.booleans()),
            "hkv": hkv, "h": hkv * draw(st.sampled_from([1, 3])), "d": draw(st.sampled_from(head_dims)),
            "dtype": draw(st.sampled_from(dtypes)), "causal": draw(st.sampled_from([True, True, False])),
            "window": draw(st.sampled_from([(-1, -1), (-1, -1), (3, 0), (0, 0)])),
            "alibi": draw(st.sampled_from([False, False, True])) if scores else False,
            "softcap": draw(st.sampled_from([0.0, 0.0, 3.0])) if scores else 0.0,
            "special": draw(st.sampled_from(["none"] * 3 + ["nan_q"])),
            "seed": draw(st.integers(0, 2**31 - 1)),
            "sinks": draw(st.sampled_from(PAGED_SINKS)), "sinks_f32": draw(st.booleans()),
            "invalid": draw(st.sampled_from([""] * 14 + list(PAGED_INVALID)))}


def paged_cache(case, dt, options):
    """(key_cache, value_cache, block_table, cache_seqlens) of a case: a pool whose unused slots hold NaN
    (a real pool holds stale or garbage values there; they must never be read). `options`: the variant's
    extra cache options (a KV storage format, e.g. {"kv_dtype": "int8"}): the cache is then a
    ``memattn.cache.PagedKVCache(..., **options)`` written through ``write``, and its key_cache/value_cache
    pages are returned (``_format_cache``); the reference reads their dequantized tokens."""
    g = random.Random(case["seed"])
    bs, hkv, d = case["block_size"], case["hkv"], case["d"]
    per = [-(-c // bs) for c in case["ctx"]]
    width = max(per + [1])
    nblocks = sum(per) + case["extra_blocks"] + 1
    ids = list(range(nblocks))
    g.shuffle(ids)
    table = torch.zeros(len(case["ctx"]), width, dtype=torch.int32)
    used, it = set(), iter(ids)
    for i, n in enumerate(per):
        for j in range(n):
            if case["repeat_ids"] and i > 0 and j == 0 and per[0]:  # two sequences share a block (a prefix)
                table[i, j] = table[0, 0]
            else:
                table[i, j] = next(it)
            used.add((int(table[i, j]), i, j))
        for j in range(n, width):
            table[i, j] = g.choice([0, nblocks - 1])  # past the context: never read
    fresh = _randn((nblocks, bs, hkv, d), dt, case["seed"] + 7), _randn((nblocks, bs, hkv, d), dt, case["seed"] + 8)
    if options:
        return _format_cache(case, dt, options, nblocks, used, fresh) + (table, torch.tensor(case["ctx"], dtype=torch.int32))
    kc = torch.full((nblocks, bs, hkv, d), float("nan"), dtype=dt)
    vc = torch.full((nblocks, bs, hkv, d), float("nan"), dtype=dt)
    for blk, i, j in used:  # the tokens sequence i keeps in logical block j
        n = min(bs, case["ctx"][i] - j * bs)
        kc[blk, :n], vc[blk, :n] = fresh[0][blk, :n], fresh[1][blk, :n]
    return kc, vc, table, torch.tensor(case["ctx"], dtype=torch.int32)


def _format_cache(case, dt, options, nblocks, used, fresh):
    """(key pages, value pages) of a ``PagedKVCache(..., **options)`` holding the case's tokens, written
    through ``write``; NaN tokens in the slots no sequence keeps (for KIVI's per-block key statistics: in the
    blocks no sequence keeps), which must never be read."""
    from memattn.cache import PagedKVCache
    from memattn.cache.kv_formats import kv_format
    bs, hkv, d = case["block_size"], case["hkv"], case["d"]
    kivi = kv_format(options.get("kv_dtype", "auto")).kivi
    extra = {"residual_blocks": nblocks} if kivi else {}  # every partial block stays at full precision
    cache = PagedKVCache(1, nblocks, bs, hkv, d, dtype=dt, **options, **extra)
    keep = torch.zeros(nblocks * bs, dtype=torch.bool)
    for blk, i, j in used:
        keep[blk * bs: blk * bs + min(bs, case["ctx"][i] - j * bs)] = True
    if kivi:
        keep_blocks = keep.view(nblocks, bs).any(1, keepdim=True).expand(nblocks, bs).reshape(-1)
        stale = ~keep_blocks
    else:
        stale = ~keep
    slots = keep.nonzero().flatten()
    cache.write(slots, fresh[0].reshape(-1, hkv, d)[slots], fresh[1].reshape(-1, hkv, d)[slots])
    bad = stale.nonzero().flatten()
    nan = torch.full((bad.numel(), hkv, d), float("nan"), dtype=dt)
    cache.write(bad, nan, nan)
    return cache.key_cache(0), cache.value_cache(0)


def _full_width(cache):
    """A cache as the references read it: (oracle's, naive_T's). Quantized pages dequantized: for the oracle
    in float32, unrounded (codes x scale, as a kernel reading them in place computes them), for naive_T in
    the pool's dtype (``QuantizedPages.dequantize()``, as the gather schedule reads them); a full-width
    tensor as it is."""
    from memattn.cache.kv_formats import QuantizedPages
    if not isinstance(cache, QuantizedPages):
        return cache, cache
    exact = QuantizedPages(cache.format, cache.side, cache.codes, cache.scale, cache.zero, cache.residual,
                           cache.residual_map, dtype=torch.float32)
    return exact.dequantize(), cache.dequantize()


def _paged_sinks(case, h, dt):
    if case.get("sinks") is None:
        return None
    g = torch.Generator().manual_seed(case["seed"] + 11)
    t = 3.0 + 2.0 * torch.randn(h, generator=g, dtype=torch.float64)
    if case["sinks"] != "normal":
        t[int(torch.randint(0, h, (1,), generator=g))] = float(case["sinks"])
    return t.to(torch.float32 if case["sinks_f32"] else dt)


def check_paged(case, decode, options):
    dt = DT[case["dtype"]]
    kc, vc, table, ctx = paged_cache(case, dt, options)
    h, d = case["h"], case["d"]
    lq = case["lq"]
    packed = len(set(lq)) > 1
    q = _randn((sum(lq), h, d), dt, case["seed"] + 3)
    if case["special"] == "nan_q" and q.numel():
        q[0, 0, 0] = float("nan")
    cu = torch.tensor([0] + torch.tensor(lq, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32) if lq else \
        torch.zeros(1, dtype=torch.int32)
    qx = q if packed else q.view(len(lq), lq[0] if lq else 1, h, d)  # batch 0: (0, 1, H, D)
    slopes = torch.linspace(0.1, 1.0, h) if case["alibi"] else None
    sinks = _paged_sinks(case, h, dt)
    kw = dict(cu_seqlens_q=cu if packed else None, causal=case["causal"], window_size=case["window"],
              alibi_slopes=slopes, softcap=case["softcap"], return_lse=True, sinks=sinks)
    (k64, kref), (v64, vref) = _full_width(kc), _full_width(vc)  # what the oracle and naive_T read
    bad = case["invalid"]
    ctxm = contextlib.nullcontext() if decode is None else memattn.use_backend(decode=decode)

    def call(q_, kc_, vc_, table_, ctx_, **over):
        with ctxm:
            return memattn.paged_attention(q_, kc_, vc_, table_, ctx_, **{**kw, **over})
    if bad:
        if not case["ctx"] or max(case["ctx"]) == 0:
            return  # nothing read: every perturbation below is about a read
        t, c, kc2, vc2, over = table.clone(), ctx.clone(), kc, vc, {}
        i = max(range(len(case["ctx"])), key=lambda i: case["ctx"][i])
        if bad == "negative_id":
            t[i, 0] = -1
        elif bad == "id_out_of_range":
            t[i, 0] = kc.shape[0]
        elif bad == "ctx_past_table":
            c[i] = t.shape[1] * case["block_size"] + 1
        elif bad == "ctx_negative":
            c[i] = -1
        elif bad == "q_longer_than_ctx":
            if not packed:
                return
            cu2 = cu.clone()
            cu2[i + 1:] += int(c[i]) + 1
            over = {"cu_seqlens_q": cu2}
            q2 = torch.cat([q, _randn((int(c[i]) + 1, h, d), dt, 1)])
            expect_error(lambda: call(q2, kc, vc, t, c, **over), PAGED_INVALID[bad])
            return
        elif bad == "table_int64":
            t = t.long()
        elif bad == "ctx_int64":
            c = c.long()
        elif bad == "cache_dtype":  # (of a quantized pool: its dequantized keys in another dtype)
            kc2 = kref.to(torch.float64 if dt != torch.float64 else torch.float32)
        elif bad == "cache_heads":
            kc2 = vc2 = torch.zeros(kc.shape[0], kc.shape[1], h + 1, d, dtype=dt)
        elif bad == "sinks_shape":
            over = {"sinks": torch.zeros(h + 1) if d % 2 else torch.zeros(1, h)}
        elif bad == "sinks_dtype":
            over = {"sinks": torch.zeros(h, dtype=torch.float64 if dt != torch.float64 else torch.float16)}
        expect_error(lambda: call(qx, kc2, vc2, t, c, **over), PAGED_INVALID[bad])
        return
    out, lse = must_run(lambda: call(qx, kc, vc, table, ctx))
    rkw = dict(kw, cu_seqlens_q=cu if packed else None)
    rkw64 = dict(rkw, sinks=None if sinks is None else sinks.double())
    nai = reference.paged_attention(qx, kref, vref, table, ctx, **rkw)
    fl = attention_floors(q, _finite_or_zero(kref), _finite_or_zero(vref), keys=max([1] + case["ctx"]))
    fl["out"] += stored_p_floor(dt, _finite_or_zero(vref))  # the gather schedule runs the fused tile
    # quantized pages have two readings, both the format's: a kernel reading codes in place computes codes x
    # scale in float32, the gather schedule rounds them to the pool's dtype first. The result is held to
    # the FA rule against the float64 reference on either (rounding of the values is not the rule's business).
    readings = [(k64, v64)] + ([(kref, vref)] if k64 is not kref else [])
    first = None
    for kr, vr in readings:
        r64 = reference.paged_attention(qx.double(), kr.double(), vr.double(), table, ctx, **rkw64)
        try:
            compare("out", out, r64[0], nai[0], floor=fl["out"])
            compare("lse", lse, r64[1], nai[1].to(lse.dtype), floor=fl["lse"], lse=True)
            return
        except Failure as e:
            first = first or e
    raise first


def _finite_or_zero(t):
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype))


# ------------------------------------------------------------------------------------------ merge_attention

@st.composite
def merge_cases(draw):
    return {"b": draw(st.sampled_from([0, 1, 2])), "s": draw(st.sampled_from([0, 1, 3, 8])),
            "sk": draw(st.sampled_from([0, 1, 2, 7])), "split": draw(st.floats(0, 1)),
            "h": draw(st.sampled_from([1, 3])), "d": draw(st.sampled_from([1, 8, 33])),
            "dtype": draw(st.sampled_from(list(DT))), "causal": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**31 - 1)),
            "invalid": draw(st.sampled_from([""] * 6 + ["out_shape", "lse_shape", "lse_layout"]))}


def check_merge(case):
    dt = DT[case["dtype"]]
    b, s, sk, h, d = case["b"], case["s"], case["sk"], case["h"], case["d"]
    q, k, v = (_randn((b, n, h, d), dt, case["seed"] + i) for i, n in enumerate((s, sk, sk)))
    cut = int(case["split"] * sk)
    mask = _window_mask(s, sk, case["causal"], (-1, -1))[0]
    parts = []
    for lo, hi in ((0, cut), (cut, sk)):
        o, l_ = reference.attention(q, k[:, lo:hi], v[:, lo:hi], mask=mask[:, lo:hi], return_lse=True)
        parts += [o, l_.float() if dt != torch.float64 else l_]
    if case["invalid"]:
        oa, la, ob, lb = parts
        if case["invalid"] == "out_shape":
            ob = torch.zeros(b, s, h, d + 1, dtype=dt)
        elif case["invalid"] == "lse_shape":
            lb = torch.zeros(b, h, s + 1)
        else:
            la = lb = torch.zeros(b, s, h)
            if h == s:
                return
        expect_error(lambda: memattn.merge_attention(oa, la, ob, lb), ("out", "lse", "out_a", "lse_a"))
        return
    out, lse = must_run(lambda: memattn.merge_attention(*parts))
    r64 = reference.attention(q.double(), k.double(), v.double(), mask=mask, return_lse=True)
    nai = reference.attention(q, k, v, mask=mask, return_lse=True)
    fl = attention_floors(q, k, v, keys=max(1, sk))
    # the two parts come rounded to T (each a naive run in T): add that rounding, u(T) max|out| per part
    u = torch.finfo(dt).eps / 2
    compare("out", out, r64[0], nai[0].to(out.dtype), floor=2 * fl["out"] + 2 * u * amax(r64[0]))
    compare("lse", lse, r64[1], nai[1].to(lse.dtype), floor=2 * fl["lse"] + 2 * u * amax(r64[1]), lse=True)


# ------------------------------------------------------------------------------------------ linear attention

LINEAR_INVALID = {"causal_lengths": ("seqlen_q", "seqlen_k", "causal"), "chunk_size": ("chunk_size",),
                  "form": ("form",), "form_mismatch": ("form", "causal"), "feature_map": ("feature_map",),
                  "eps": ("eps",), "state_shape": ("initial_state", "kv"), "causal_int": ("causal",)}


@st.composite
def linear_cases(draw):
    hkv = draw(st.sampled_from([1, 2]))
    causal = draw(st.booleans())
    return {"b": draw(st.sampled_from([0, 1, 2])), "s": draw(st.sampled_from([0, 1, 2, 5, 17, 33])),
            "hkv": hkv, "h": hkv * draw(st.sampled_from([1, 2])), "d": draw(st.sampled_from([1, 3, 8, 16])),
            "dtype": draw(st.sampled_from(list(DT))), "causal": causal,
            "form": draw(st.sampled_from(["auto", "recurrent", "chunked"] if causal else ["auto", "noncausal"])),
            "chunk_size": draw(st.sampled_from([1, 3, 16, 64])), "init": draw(st.booleans()),
            "final": draw(st.booleans()), "seed": draw(st.integers(0, 2**31 - 1)),
            "invalid": draw(st.sampled_from([""] * 10 + list(LINEAR_INVALID)))}


def _linear_inputs(case):
    dt = DT[case["dtype"]]
    b, s, h, hkv, d = case["b"], case["s"], case["h"], case["hkv"], case["d"]
    q = _randn((b, s, h, d), dt, case["seed"])
    k = _randn((b, s, hkv, d), dt, case["seed"] + 1)
    v = _randn((b, s, hkv, d), dt, case["seed"] + 2)
    cd = torch.float64 if dt == torch.float64 else torch.float32
    init = None
    if case["init"]:
        init = (_randn((b, h, d, d), cd, case["seed"] + 3).abs(), _randn((b, h, d), cd, case["seed"] + 4).abs())
    return q, k, v, init


def check_linear(case):
    q, k, v, init = _linear_inputs(case)
    kw = dict(causal=case["causal"], form=case["form"], chunk_size=case["chunk_size"], initial_state=init,
              output_final_state=case["final"])
    bad = case["invalid"]
    if bad:
        if bad == "causal_lengths":
            kw.update(causal=True, form="auto")
            k = torch.cat([k, k[:, :1]], 1) if k.shape[1] else torch.zeros(k.shape[0], 1, *k.shape[2:], dtype=k.dtype)
            v = k.clone()
        elif bad == "chunk_size":
            kw["chunk_size"] = 0
        elif bad == "form":
            kw["form"] = "fastest"
        elif bad == "form_mismatch":
            kw["form"] = "noncausal" if case["causal"] else "recurrent"
        elif bad == "feature_map":
            kw["feature_map"] = "softmax"
        elif bad == "eps":
            kw["eps"] = -1.0
        elif bad == "state_shape":
            kw["initial_state"] = (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2))
            if (q.shape[0], q.shape[2], q.shape[3]) == (1, 1, 2):
                return
        elif bad == "causal_int":
            kw["causal"] = 1
        expect_error(lambda: memattn.linear_attention(q, k, v, **kw), LINEAR_INVALID[bad])
        return
    res = must_run(lambda: memattn.linear_attention(q, k, v, **kw))
    ref = memattn.linear_attention(q.double(), k.double(), v.double(), **dict(kw, form="naive", initial_state=None
                                   if init is None else tuple(t.double() for t in init)))
    nai = memattn.linear_attention(q, k, v, **dict(kw, form="naive"))
    outs = (res, ref, nai) if not case["final"] else (res[0], ref[0], nai[0])
    fl = linear_floors(q, k, v, init, (torch.ones(q.shape, dtype=torch.float64), torch.ones(()), torch.ones(())),
                       causal=case["causal"]) if q.numel() else {"out": 0.0, "kv": 0.0, "z": 0.0}
    compare("out", outs[0], outs[1], outs[2], floor=fl["out"])
    if case["final"]:
        for i, name in enumerate(("kv", "z")):
            compare(name, res[1][i], ref[1][i], nai[1][i], floor=fl[name])


def check_linear_state(case):
    if case["invalid"] or not case["causal"]:
        q, k, v, _ = _linear_inputs(case)
        b, h, d = q.shape[0], q.shape[2], q.shape[3]
        st_ = memattn.LinearAttentionState.zeros(max(b, 1), h, d, d, dtype=torch.float64 if q.dtype == torch.float64
                                                   else torch.float32)
        bad_q = torch.zeros(max(b, 1) + 1, h, d, dtype=q.dtype)
        expect_error(lambda: st_.step(bad_q, bad_q[:, :1], bad_q), ("q_t", "k_t", "v_t", "q", "batch"))
        return
    q, k, v, init = _linear_inputs(case)
    b, s, h, d = q.shape
    if b == 0:
        expect_error(lambda: memattn.LinearAttentionState.zeros(0, h, d, d), ("batch",))
        return
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = h // k.shape[2]  # the state keeps one (kv, z) per query head: keys and values come per query head
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    state = memattn.LinearAttentionState.zeros(b, h, d, d, dtype=cd)
    outs = [must_run(lambda t=t: state.step(q[:, t], k[:, t], v[:, t])) for t in range(s)]
    ours = torch.stack(outs, 1) if outs else torch.zeros(q.shape, dtype=q.dtype)
    ref = memattn.linear_attention(q.double(), k.double(), v.double(), causal=True, form="naive")
    nai = memattn.linear_attention(q, k, v, causal=True, form="naive")
    fl = linear_floors(q, k, v, None, (torch.ones(q.shape, dtype=torch.float64), torch.ones(()), torch.ones(())),
                       causal=True) if q.numel() else {"out": 0.0}
    compare("out", ours, ref, nai, floor=fl["out"])


# ------------------------------------------------------------------------------------------ ring attention

RING_INVALID = ("k_dtype", "heads", "head_dim", "q_dims", "batch", "seqlen_v", "softmax_scale", "causal_int")


@functools.lru_cache(maxsize=None)
def _one_rank_world():
    import torch.distributed as dist
    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(prefix="memattn-fuzz-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    return True


@st.composite
def ring_cases(draw):
    case = draw(dense.attention_cases(options=(), invalid=RING_INVALID, block_sizes=[None]))
    case["sk"] = case["sq"]  # one rank holds the whole sequence: Sq == Sk
    case["layout_ring"] = draw(st.sampled_from(["contiguous", "zigzag"]))
    case["special"] = case["special"] if case["special"] in ("none", "nan_q", "big", "tiny") else "none"
    return case


def check_ring(case):
    _one_rank_world()
    from memattn.distributed import RingError, ring_attention

    def call(q, k, v, kwargs, override):
        kw = {n: kwargs[n] for n in ("causal", "softmax_scale") if n in kwargs}
        return ring_attention(q, k, v, layout=case["layout_ring"], return_lse=True, **kw)
    if case["invalid"]:  # one problem per case: an even length, so the zigzag layout has no complaint of its own
        case = dict(case, sq=case["sq"] + case["sq"] % 2, sk=case["sq"] + case["sq"] % 2)
        q, k, v, kwargs, dims = dense.build(case)
        q, k, v, kwargs, _ = dense.corrupt(case, q, k, v, kwargs, dims)
        expect_error(lambda: call(q, k, v, kwargs, None), dense.INVALID[case["invalid"]], allowed_named=(RingError,))
        return
    if case["layout_ring"] == "zigzag" and case["causal"] and case["sq"] % 2:  # two equal chunks per rank
        q, k, v, kwargs, dims = dense.build(case)
        expect_error(lambda: call(q, k, v, kwargs, None), ("zigzag",), allowed_named=(RingError,))
        return
    dense.run_attention(case, call, allowed_named=(RingError,))


# ------------------------------------------------------------------------------------------ caches

@st.composite
def cache_cases(draw):
    return {"kind": draw(st.sampled_from(["kv", "kv_max", "sliding"])), "batch": draw(st.sampled_from([1, 2, 0, -1])),
            "hkv": draw(st.sampled_from([1, 2])), "d": draw(st.sampled_from([1, 4])),
            "cap": draw(st.sampled_from([1, 3, 8])),
            "updates": draw(st.lists(st.sampled_from([0, 1, 1, 2, 5, 9]), max_size=6)),
            "bad_update": draw(st.sampled_from(["", "", "", "heads", "batch", "dims"])),
            "seed": draw(st.integers(0, 2**31 - 1))}


def check_cache(case):
    from memattn.cache import KVCache, SlidingWindowKVCache
    b, hkv, d, cap = case["batch"], case["hkv"], case["d"], case["cap"]
    make = {"kv": lambda: KVCache(b, hkv, d, initial_capacity=cap), "kv_max": lambda: KVCache(b, hkv, d, max_seqlen=cap),
            "sliding": lambda: SlidingWindowKVCache(b, cap, hkv, d)}[case["kind"]]
    if b <= 0:
        expect_error(make, ("batch",))
        return
    cache = must_run(make)
    seen_k, total = [], 0
    for i, n in enumerate(case["updates"]):
        k = _randn((b, n, hkv, d), torch.float32, case["seed"] + i)
        v = k + 1
        if case["kind"] == "kv_max" and total + n > cap:
            expect_error(lambda: cache.update(k, v), ("max_seqlen",))
            return
        keys, values = must_run(lambda: cache.update(k, v))
        seen_k.append(k)
        total += n
        allk = torch.cat(seen_k, 1)
        if case["kind"] == "sliding":
            if n == 1:  # the ring itself: every filled slot, in slot order
                want = allk[:, max(0, total - cap):]
                if sorted(keys.reshape(b, -1).sum(0).tolist()) != sorted(want.reshape(b, -1).sum(0).tolist()) and \
                        not torch.equal(keys.sort(1).values, want.sort(1).values):
                    wrong("sliding window cache: the ring does not hold the last window tokens")
            else:
                want = allk[:, max(0, total - n - (cap - 1)):]
                if not torch.equal(keys, want) or not torch.equal(values, want + 1):
                    wrong(f"sliding window cache: update returned {tuple(keys.shape)} keys, not the last window")
            if not torch.equal(cache.keys, allk[:, max(0, total - cap):]):
                wrong("sliding window cache: keys are not the last min(seqlen, window) tokens")
        elif not torch.equal(keys, allk) or not torch.equal(values, allk + 1):
            wrong("KV cache: update did not return every token appended so far")
    if case["bad_update"]:
        bad = {"heads": (b, 1, hkv + 1, d), "batch": (b + 1, 1, hkv, d), "dims": (b, hkv, d)}[case["bad_update"]]
        t = torch.zeros(bad)
        expect_error(lambda: cache.update(t, t), ("k", "v"))


@st.composite
def paged_storage_cases(draw):
    nb, bs = draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([1, 3, 4]))
    n = draw(st.sampled_from([0, 1, 2, 5]))
    slots = draw(st.lists(st.integers(-2, nb * bs + 1), min_size=n, max_size=n))
    return {"layers": draw(st.sampled_from([1, 2])), "nb": nb, "bs": bs, "hkv": draw(st.sampled_from([1, 2])),
            "d": draw(st.sampled_from([1, 4])), "slots": slots, "layer": draw(st.sampled_from([0, 1, -1, 2])),
            "slot_dtype": draw(st.sampled_from(["int64", "int64", "int32", "float32"])),
            "bad_shape": draw(st.sampled_from([False, False, False, True])), "seed": draw(st.integers(0, 2**31 - 1))}


def check_paged_storage(case):
    from memattn.cache import PagedKVCache
    cache = must_run(lambda: PagedKVCache(case["layers"], case["nb"], case["bs"], case["hkv"], case["d"]))
    n = len(case["slots"])
    slots = torch.tensor(case["slots"], dtype=getattr(torch, case["slot_dtype"]))
    k = _randn((n + case["bad_shape"], case["hkv"], case["d"]), torch.float32, case["seed"])
    v = k * 2
    layer = case["layer"]
    total = case["nb"] * case["bs"]
    # negative slots are padding (skipped, as documented); a slot written twice keeps one of its tokens
    valid = (case["slot_dtype"] != "float32" and not case["bad_shape"] and 0 <= layer < case["layers"]
             and all(s < total for s in case["slots"]))
    names = ("slot_mapping", "k", "v", "layer")
    if not valid:
        expect_error(lambda: cache.write(slots, k, v, layer=layer), names)
        return
    must_run(lambda: cache.write(slots, k, v, layer=layer))
    flat = cache.key_cache(layer).reshape(-1, case["hkv"], case["d"])
    once = [i for i, s in enumerate(case["slots"]) if s >= 0 and case["slots"].count(s) == 1]
    if once and not torch.equal(flat[slots[once].long()], k[once]):
        wrong("PagedKVCache.write: the slots do not hold the written keys")


# ------------------------------------------------------------------------------------------ block manager

@st.composite
def block_manager_cases(draw):
    ops = draw(st.lists(st.tuples(st.sampled_from(["allocate", "append", "fork", "free", "free", "mark"]),
                                  st.integers(0, 4), st.integers(0, 4), st.integers(0, 20)), max_size=25))
    return {"num_blocks": draw(st.sampled_from([1, 2, 4, 8, 0])), "block_size": draw(st.sampled_from([1, 2, 4, 16])),
            "prefix": draw(st.booleans()), "ops": ops, "vocab": draw(st.sampled_from([1, 3, 50]))}


def check_block_manager(case):
    from memattn.cache import BlockManager
    from memattn.cache.block_manager import OutOfBlocksError
    if case["num_blocks"] <= 0:
        expect_error(lambda: BlockManager(case["num_blocks"], case["block_size"]), ("num_blocks",))
        return
    bm = must_run(lambda: BlockManager(case["num_blocks"], case["block_size"], enable_prefix_caching=case["prefix"]))
    live: dict[int, int] = {}
    g = random.Random(len(case["ops"]))
    for op, a, c, n in case["ops"]:
        toks = [g.randrange(case["vocab"]) for _ in range(n)]
        if op == "allocate":
            if a in live or not toks:
                expect_error(lambda: bm.allocate(a, toks), ("sequence", "tokens", "seq_id"))
            elif must_run(lambda: bm.allocate(a, toks), allowed=(OutOfBlocksError,)) is not None:
                live[a] = len(toks)
        elif op == "append":
            if a not in live:
                expect_error(lambda: bm.append_slots(a, toks), ("sequence", "seq_id"), allowed=(KeyError,))
            elif must_run(lambda: bm.append_slots(a, toks), allowed=(OutOfBlocksError,)) is not None:
                live[a] += len(toks)
        elif op == "fork":
            if a not in live or c in live:
                expect_error(lambda: bm.fork(a, c), ("sequence", "seq_id", "parent_id", "child_id"), allowed=(KeyError,))
            else:
                must_run(lambda: bm.fork(a, c))
                live[c] = live[a]
        elif op == "free":
            if a not in live:
                expect_error(lambda: bm.free(a), ("sequence", "seq_id"), allowed=(KeyError,))
            else:
                must_run(lambda: bm.free(a))
                del live[a]
        elif op == "mark" and a in live:
            must_run(lambda: bm.mark_computed(a, min(n, live[a])))
        # invariants: every block referenced as often as the live tables name it; free = unreferenced
        refs = [0] * bm.num_blocks
        for s, ntok in live.items():
            table = bm.block_table(s)
            if len(table) != -(-ntok // bm.block_size):
                wrong(f"sequence {s}: {len(table)} blocks for {ntok} tokens of {bm.block_size}")
            for blk in table:
                refs[blk] += 1
        for blk in range(bm.num_blocks):
            if bm.ref_count(blk) != refs[blk]:
                wrong(f"block {blk}: ref count {bm.ref_count(blk)} but named {refs[blk]} times by live tables")
        if bm.num_free_blocks != refs.count(0):
            wrong(f"{bm.num_free_blocks} free blocks but {refs.count(0)} unreferenced")


# ------------------------------------------------------------------------------------------ masks and mask specs

SPEC_PARTS = ["causal", "causal()", "sliding_window(3)", "sliding_window(2, 1)", "sliding_window(-3)",
              "global_tokens([0, 5])", "global_tokens([])", "global_tokens([-1])", "strided(4)", "strided(0)",
              "fixed(4, 1)", "fixed(0, 0)", "bigbird(4)", "bigbird(0)", "document([3, 5])", "document([0, 2])",
              "document([])", "causal(3)", "nonsense", "sliding_window(x)", "(", "causal & ", "1 + 2", "", "  ",
              "sliding_window(1e9)", "strided(True)", "global_tokens('a')", "__import__('os')", "bigbird(4, seed=1)"]


@st.composite
def mask_cases(draw):
    parts = draw(st.lists(st.sampled_from(SPEC_PARTS), min_size=1, max_size=3))
    ops = draw(st.lists(st.sampled_from([" & ", " | "]), min_size=len(parts) - 1, max_size=len(parts) - 1))
    spec = parts[0] + "".join(o + p for o, p in zip(ops, parts[1:]))
    return {"spec": spec, "seq_len": draw(st.sampled_from([1, 5, 16, 33, 0, -2])),
            "block": draw(st.sampled_from([None, 1, 4, 7, 0])), "seed": draw(st.integers(0, 2**31 - 1))}


def check_mask(case):
    """A spec parses to a mask or raises a clear error; a mask's tile layout agrees with its element mask
    (EMPTY tiles hold no visible pair, FULL tiles nothing else), and attention under it matches the reference."""
    from memattn import mask_spec, masks
    from memattn.cli import main
    spec = case["spec"]
    mask = either(lambda: mask_spec.parse(spec), ("spec", "mask", "seqlens", "indices", "stride", "block", "left",
                                                   "right", "block_size", "summary", "window_blocks"))
    s, block = case["seq_len"], case["block"]
    argv = ["masks", "show", spec, "--seq-len", str(s)] + ([] if block is None else ["--block", str(block)])
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
            rc = main(argv)
    except SystemExit as e:
        rc = e.code
    except Exception as e:  # noqa: BLE001
        kind, msg = classify_error(e, ("spec", "seq_len", "block", "seqlens", "document", "Sq", "Sk"))
        if kind != OK:
            raise Failure(kind, f"memattn {' '.join(argv)!r}: {msg}") from None
        rc = 2
    if rc not in (0, 2):
        wrong(f"memattn masks show exited {rc!r}")
    if mask is None or s <= 0:
        return
    blk = block if block and block > 0 else 4
    dense_m = either(lambda: mask.dense(s, s, "cpu"), ("seqlen", "seqlen_q", "seqlen_k", "mask", "Sq", "Sk"))
    if dense_m is None:
        return
    dense_m = dense_m.reshape(-1, s, s)[0] if dense_m.dim() > 2 else dense_m
    kinds = must_run(lambda: mask_spec.layout(mask, s, blk))
    e = [min(i * blk, s) for i in range(kinds.shape[0] + 1)]
    for i in range(kinds.shape[0]):
        for j in range(kinds.shape[1]):
            tile = dense_m[e[i]:e[i + 1], e[j]:e[j + 1]] if i < len(e) - 1 and j < len(e) - 1 else None
            if tile is None or tile.numel() == 0:
                continue
            kind = int(kinds[i, j])
            if kind == masks.EMPTY and bool(tile.any()):
                wrong(f"{spec!r} S={s} block {blk}: tile ({i}, {j}) is EMPTY but holds visible pairs")
            if kind == masks.FULL and not bool(tile.all()):
                wrong(f"{spec!r} S={s} block {blk}: tile ({i}, {j}) is FULL but holds masked pairs")
    q, k, v = (_randn((1, s, 2, 8), torch.float32, case["seed"] + i) for i in range(3))
    out = must_run(lambda: memattn.attention(q, k, v, mask=mask, block_size=blk))
    ref = reference.attention(q.double(), k.double(), v.double(), mask=mask.dense(s, s, "cpu"))
    nai = reference.attention(q, k, v, mask=mask.dense(s, s, "cpu"))
    compare("out", out, ref, nai, floor=attention_floors(q, k, v)["out"])


# ------------------------------------------------------------------------------------------ memory.estimate, CLI

SIZES = st.sampled_from([1, 2, 7, 64, 4096, 0, -1, 2.5, True, "8", None, 10**12])


@st.composite
def estimate_cases(draw):
    return {"method": draw(st.sampled_from(["standard", "checkpoint", "blockwise", "window", "linear", "flash", "",
                                            None])),
            "batch": draw(SIZES), "seqlen": draw(SIZES), "heads": draw(SIZES), "head_dim": draw(SIZES),
            "dtype": draw(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8", "str"])),
            "backward": draw(st.sampled_from([False, True, 1])), "layers": draw(SIZES),
            "block_size": draw(st.sampled_from([1, 64, 1024, 0, -4])), "threads": draw(st.sampled_from([None, 1, 4, 0]))}


def check_estimate(case):
    from memattn.memory import estimate
    dtype = getattr(torch, case["dtype"]) if case["dtype"] != "str" else "float32"
    args = {n: case[n] for n in ("batch", "seqlen", "heads", "head_dim", "layers")}
    ok_int = lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0  # noqa: E731
    valid = (case["method"] in ("standard", "checkpoint", "blockwise", "window", "linear")
             and all(ok_int(x) for x in args.values()) and case["dtype"] in ("float32", "float16", "bfloat16", "float64")
             and isinstance(case["backward"], bool) and case["block_size"] > 0
             and (case["threads"] is None or case["threads"] > 0))
    call = lambda: estimate(case["method"], dtype=dtype, backward=case["backward"], block_size=case["block_size"],  # noqa: E731
                            threads=case["threads"], **args)
    names = ("method", "batch", "seqlen", "heads", "head_dim", "dtype", "backward", "layers", "block_size", "threads")
    if valid:
        n = must_run(call)
        if not isinstance(n, int) or n <= 0:
            wrong(f"estimate returned {n!r}, not a positive int of bytes")
    else:
        n = either(call, names)
        if n is not None and not (isinstance(n, int) and n >= 0):
            wrong(f"estimate returned {n!r} for an invalid call")


CLI_WORDS = ["compare", "favor-sweep", "masks", "show", "generate", "chat", "serve", "bench-serve", "--seq-lens",
             "1,2", "0", "-3", "x", "--batch", "--heads", "--head-dim", "--dtype", "float33", "float16", "--methods",
             "--model", "--random", "tiny-llama", "--prompt", "hi", "--port", "99999", "--max-tokens", "--temperature",
             "-1", "nan", "--top-p", "2", "--seq-len", "--block", "causal", "--features", "", "--", "-h", "--help",
             "--json", "--version", "--n", "--seed"]


@st.composite
def cli_cases(draw):
    return {"argv": draw(st.lists(st.sampled_from(CLI_WORDS), max_size=7))}


def check_cli(case):
    """Argument parsing only: ``build_parser().parse_args`` returns a namespace or exits through argparse
    (status 0 for --help, 2 for a usage error); nothing else escapes it."""
    from memattn.cli import build_parser
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
            build_parser().parse_args(case["argv"])
    except SystemExit as e:
        if e.code not in (0, 2):
            wrong(f"parse_args({case['argv']!r}) exited with {e.code!r}")
    except Exception as e:  # noqa: BLE001
        kind, msg = classify_error(e, ("argv",))
        raise Failure(kind if kind != OK else "unclear", f"parse_args raised {msg}") from None


# ------------------------------------------------------------------------------------------ engine requests

PARAM_VALUES = {"n": [1, 2, 0, -1, 1.5, True, 100], "temperature": [0, 0.7, 1.0, -0.1, float("nan"), float("inf"), "1"],
                "top_k": [-1, 0, 5, -2, 2.0], "top_p": [1.0, 0.5, 0.0, 1.5, float("nan")],
                "seed": [None, 0, 7, -1, 2.5], "max_tokens": [1, 4, 0, -3, 10**9],
                "stop_token_ids": [(), (1, 2), (-1,), ("a",), [3]], "ignore_eos": [False, True],
                "return_logits": [False, True]}
PROMPTS = ["hello", "", [1, 2, 3], [], [-1], [10**6], [0], [1.5], None, 42, "x" * 200, [256, 255]]


# engine options of LLM(...): KV storage format and StreamingLLM (a few drawn per case, the rest default)
ENGINE_VALUES = {"kv_cache_dtype": ["auto", "int8", "fp8_e4m3", "int4", "int2", "int3", "INT8", "", 8, None],
                 "attention_sinks": [0, 2, 4, -1, 2.5, True, "4"],
                 "streaming_window": [None, 8, 16, 0, -4, 3.5, "8"]}


@st.composite
def request_cases(draw):
    params = {k: draw(st.sampled_from(v)) for k, v in PARAM_VALUES.items() if draw(st.booleans())}
    engine = {k: draw(st.sampled_from(v)) for k, v in ENGINE_VALUES.items() if draw(st.booleans())}
    return {"params": params, "prompt": draw(st.sampled_from(PROMPTS)), "engine": engine,
            "step": draw(st.booleans()),
            "as_dict": draw(st.booleans()), "unknown": draw(st.sampled_from([False, False, False, True]))}


@functools.lru_cache(maxsize=None)
def _llm(engine=()):
    """A tiny random llama engine with the given engine options ((name, value) pairs), one per combination."""
    from memattn import LLM
    return LLM("tiny-llama", num_kv_blocks=16, block_size=4, max_num_seqs=4, **dict(engine))


def check_request(case):
    from memattn import SamplingParams
    params = dict(case["params"])
    if case["unknown"]:
        params["best_of"] = 2
    names = tuple(params) + ("stop token id", "sampling params", "prompt")
    engine = tuple(sorted(case.get("engine", {}).items()))
    llm = either(lambda: _llm(engine), tuple(n for n, _ in engine) or ("model",))
    if llm is None:
        return  # an engine option refused, with its name
    sp = either(lambda: SamplingParams(**params), names)
    if sp is None and not case["as_dict"]:
        return
    arg = params if case["as_dict"] else sp
    rid = either(lambda: llm.add_request(case["prompt"], arg),
                 names + ("prompt", "token", "tokens", "n", "max_num_seqs", "max_model_len", "max_tokens", "blocks",
                          "params", "completions"))
    if rid is not None:
        if case.get("step"):  # one engine step on the request (a quantized or streaming pool included)
            must_run(llm.step)
        llm.abort(rid)


# ------------------------------------------------------------------------------------------ GGUF loader

@functools.lru_cache(maxsize=None)
def _gguf_file():
    """One small valid GGUF file (a random tiny llama, F32 and F16 weights), written once per worker."""
    import test_gguf
    path = os.path.join(tempfile.mkdtemp(prefix="memattn-fuzz-gguf-"), "good.gguf")
    test_gguf.write_gguf(path, "llama", types=(test_gguf.Q.F32, test_gguf.Q.F16))
    with open(path, "rb") as f:
        return f.read()


@st.composite
def gguf_cases(draw):
    return {"mode": draw(st.sampled_from(["truncate", "flip", "flip", "header", "zeros", "good"])),
            "where": draw(st.floats(0, 1)), "flips": draw(st.integers(1, 8)), "seed": draw(st.integers(0, 2**31 - 1)),
            "field": draw(st.sampled_from(["version", "tensor_count", "kv_count"])),
            "value": draw(st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**64 - 1]))}


def check_gguf(case):
    from memattn.engine.models.gguf_loader import load_gguf
    data = bytearray(_gguf_file())
    g = random.Random(case["seed"])
    mode = case["mode"]
    if mode == "truncate":
        data = data[:int(case["where"] * len(data))]
    elif mode == "flip":
        for _ in range(case["flips"]):
            data[g.randrange(len(data))] ^= 1 << g.randrange(8)
    elif mode == "header":  # magic (4 bytes), version u32, tensor count u64, kv count u64
        off, width = {"version": (4, 4), "tensor_count": (8, 8), "kv_count": (16, 8)}[case["field"]]
        data[off:off + width] = (case["value"] % (1 << (8 * width))).to_bytes(width, "little")
    elif mode == "zeros":
        a = int(case["where"] * len(data))
        data[a:a + 4096] = bytes(min(4096, len(data) - a))
    path = os.path.join(tempfile.mkdtemp(prefix="memattn-fuzz-gguf-"), "case.gguf")
    with open(path, "wb") as f:
        f.write(data)
    try:
        res = either(lambda: load_gguf(path), ("case.gguf",))
        if mode == "good" and res is None:
            wrong("the unmodified file was refused")
    finally:
        os.remove(path)


# ------------------------------------------------------------------------------------------ the rows

# ------------------------------------------------------------------------------ training.linear_cross_entropy

LCE_INVALID = {"hidden_dim": ("hidden", "weight"), "labels_shape": ("labels",), "labels_dtype": ("labels",),
               "labels_range": ("labels",), "bias_shape": ("bias",), "chunk": ("chunk",),
               "reduction": ("reduction",), "softcap": ("softcap",), "num_items": ("num_items_in_batch",)}


@st.composite
def linear_ce_cases(draw):
    return {"n": draw(st.sampled_from([0, 1, 3, 17])), "h": draw(st.sampled_from([1, 4, 16])),
            "v": draw(st.sampled_from([1, 2, 7, 50])), "dtype": draw(st.sampled_from(list(DT))),
            "chunk": draw(st.sampled_from([None, 1, 4, 64])), "bias": draw(st.booleans()),
            "reduction": draw(st.sampled_from(["mean", "sum", "none"])), "shift": draw(st.booleans()),
            "softcap": draw(st.sampled_from([None, 0.0, 2.5])), "ignore": draw(st.sampled_from([0.0, 0.3, 1.0])),
            "special": draw(st.sampled_from([""] * 4 + ["nan_row", "inf_weight"])),
            "seed": draw(st.integers(0, 2**31 - 1)),
            "invalid": draw(st.sampled_from([""] * 8 + list(LCE_INVALID)))}


def _lce_floors(case, hidden, weight, bias, labels, cot):
    """fa_floor of the loss and of each gradient (the derivation of tests/test_training_losses.floors: a
    logit sums H products, a row's lse V exponentials, the loss N rows; a gradient row V or N terms of at
    most s = the cotangent's largest weight per row); the softcap's derivative is <= 1."""
    from conftest import fa_floor

    dt, (n, h), v = hidden.dtype, hidden.shape, weight.shape[0]
    valid = int((labels != -100).sum())
    denom = max(valid, 1) if case["reduction"] == "mean" else 1
    mh, mw, mb = amax(hidden), amax(weight), amax(bias)
    e_z = fa_floor(dt, mh * mw, h) + fa_floor(dt, mb, 1)
    e_l = fa_floor(dt, 1.0, v) + e_z
    row = e_l + e_z
    rows_max = 2 * (mh * mw * h + mb) + torch.log(torch.tensor(float(v))).item()
    loss = row if case["reduction"] == "none" else (n ** 0.5 * row + fa_floor(dt, rows_max, n)) / denom
    s = amax(cot) / denom
    return {"loss": loss, "hidden": fa_floor(dt, s * mw, v) + 2 * e_l * s * mw,
            "weight": fa_floor(dt, s * mh, n) + n ** 0.5 * 2 * e_l * s * mh,
            "bias": fa_floor(dt, s, n) + n ** 0.5 * 2 * e_l * s}


def check_linear_ce(case):
    from memattn.training import linear_cross_entropy
    from memattn.training.losses import linear_cross_entropy_reference

    dt = DT[case["dtype"]]
    n, h, v = case["n"], case["h"], case["v"]
    hidden = _randn((n, h), dt, case["seed"])
    weight = _randn((v, h), dt, case["seed"] + 1)
    bias = _randn((v,), dt, case["seed"] + 2) if case["bias"] else None
    g = torch.Generator().manual_seed(case["seed"] + 3)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < case["ignore"]] = -100
    if case["special"] == "nan_row" and n:
        hidden[n // 2] = float("nan")
    elif case["special"] == "inf_weight":
        weight[0, 0] = float("inf")
    kw = dict(bias=bias, chunk=case["chunk"], reduction=case["reduction"], shift=case["shift"],
              softcap=case["softcap"])
    bad = case["invalid"]
    if bad:
        args = [hidden, weight, labels]
        if bad == "hidden_dim":
            args[0] = _randn((n, h + 1), dt, 0)
        elif bad == "labels_shape":
            args[2] = labels[:, None].expand(n, 2)
        elif bad == "labels_dtype":
            args[2] = labels.float()
        elif bad == "labels_range":
            if n == 0 or (case["shift"] and n == 1):
                return
            args[2] = labels.clone().fill_(v)
        elif bad == "bias_shape":
            kw["bias"] = _randn((v + 1,), dt, 0)
        elif bad == "chunk":
            kw["chunk"] = 0
        elif bad == "reduction":
            kw["reduction"] = "avg"
        elif bad == "softcap":
            kw["softcap"] = -1.0
        else:
            if kw["reduction"] == "mean":
                return
            kw["num_items_in_batch"] = 3
        expect_error(lambda: linear_cross_entropy(*args, **kw), LCE_INVALID[bad])
        return
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    low = [t.clone().requires_grad_() for t in leaves]
    high = [t.double().requires_grad_() for t in leaves]

    def run(fn, ts):
        b = ts[2] if bias is not None else None
        out = fn(ts[0], ts[1], labels, **dict(kw, bias=b))
        return out

    ours = must_run(lambda: run(linear_cross_entropy, low))
    ref = run(linear_cross_entropy_reference, high)
    naive = run(linear_cross_entropy_reference, [t.clone().requires_grad_() for t in leaves])
    cot = torch.randn(tuple(ref.shape), generator=torch.Generator().manual_seed(case["seed"] + 4), dtype=torch.float64)
    fl = _lce_floors(case, hidden, weight, bias, labels if not case["shift"] else
                     torch.nn.functional.pad(labels[1:], (0, 1), value=-100), cot)

    compare("loss", ours, ref, naive.to(ours.dtype), floor=fl["loss"])
    if ref.numel() == 0:
        return
    g_ours = torch.autograd.grad((ours * cot.to(ours.dtype)).sum(), low, allow_unused=True)
    g_ref = torch.autograd.grad((ref * cot).sum(), high, allow_unused=True)
    for what, go, gr in zip(("hidden", "weight", "bias"), g_ours, g_ref):
        compare(f"grad_{what}", go, gr, None, floor=fl[what], factor=3.0, nan_only_pattern=True)


def ROWS(Entry):
    rows = [Entry("attention_varlen", varlen_cases(), check_varlen, quick=40)]
    for name, decode, dtypes, scores, options in PAGED_VARIANTS:
        quick = 6 if decode == "triton" else 40
        if options:  # a KV storage format: a few cases each in the quick profile
            quick = 8
        pack = 4 if options.get("kv_dtype") == "int2" else 2 if options.get("kv_dtype") == "int4" else 1
        dims = tuple(x for x in (1, 4, 16, 59, 64) if x % pack == 0)
        rows.append(Entry(name, paged_cases(dtypes=dtypes, scores=scores, head_dims=dims),
                          functools.partial(check_paged, decode=decode, options=options), quick=quick))
    rows += [
        Entry("merge_attention", merge_cases(), check_merge, quick=40),
        Entry("linear_attention", linear_cases(), check_linear, quick=40),
        Entry("LinearAttentionState", linear_cases(), check_linear_state, quick=20),
        Entry("ring_attention[world=1]", ring_cases(), check_ring, quick=20),
        Entry("cache.KVCache/SlidingWindowKVCache", cache_cases(), check_cache, quick=40),
        Entry("cache.PagedKVCache.write", paged_storage_cases(), check_paged_storage, quick=40),
        Entry("cache.BlockManager", block_manager_cases(), check_block_manager, quick=40),
        Entry("masks+masks_show", mask_cases(), check_mask, quick=40),
        Entry("memory.estimate", estimate_cases(), check_estimate, quick=60),
        Entry("cli.parse_args", cli_cases(), check_cli, quick=60),
        Entry("SamplingParams+LLM.add_request", request_cases(), check_request, quick=40),
        Entry("gguf.load_gguf[corrupted]", gguf_cases(), check_gguf, quick=16),
        Entry("training.linear_cross_entropy", linear_ce_cases(), check_linear_ce, quick=40),
    ]
    return rows
