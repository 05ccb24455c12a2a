"""Linear attention on CPU: causal training against causal SDPA, recurrent decoding against a KV cache.

    python benchmarks/linear.py [--cases NAME,...] [--repeats N] [--threads N] [--json PATH] [--quick] [--long]

Cases (B=1, H=8, D=64, elu features, float32):
- linear-causal-fwdbwd-S{4096,16384,65536}-fp32: memattn.linear_attention(causal=True) forward +
  backward against torch SDPA is_causal (B, H, S, D). The SDPA baseline is quadratic: at S=16384 it
  runs 3 times, at 65536 once (field ``reps``).
- linear-chunked-vs-noncausal-fwdbwd-S16384-fp32: the chunked causal form against the non-causal form
  (baseline); speedup = noncausal / chunked time (target >= 0.5: within 2x).
- decode-ctx{4096,65536}: per-token LinearAttentionState.step after a prefill of ctx tokens against
  per-token SDPA over a contiguous KV cache of ctx tokens (append one token, attend).
- --long adds linear-causal-fwdbwd-S262144-fp32 (no baseline: the training-memory claim).

Every record carries ``threads`` (intra-op threads, the same for both sides; ``--threads``, default 1: on this
shared 2-core machine a second OpenMP thread made small ops up to 60x slower and SDPA no faster).
``--repeats`` sets every case's timed runs (default: 5 or 7 per case, 3 with --quick); the quadratic SDPA
baseline keeps its cap (3 runs at S=16384, 1 at 65536).

Each case checks correctness first, then alternates ours and baseline after a warm-up and
reports medians. Peak memory (``memattn.memory.measure``): the largest running sum of allocator events
the torch profiler records during one call (bytes allocated during the call, inputs excluded).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402

from memattn.memory import measure  # noqa: E402
from memattn.ops.linear import LinearAttentionState, linear_attention  # noqa: E402

B, H, D = 1, 8, 64
MIB = 2 ** 20


def timed(fn):
    """(seconds, peak bytes allocated during fn) for one call; the time includes the profiler's start."""
    t0 = time.perf_counter()
    peak = measure(fn)
    return time.perf_counter() - t0, peak


def compare(ours, base, reps: int, base_reps: int | None = None):
    """Warm up, then interleave ours / baseline; medians of time, max of peak."""
    base_reps = reps if base_reps is None else base_reps
    ours()
    if base_reps == reps:
        base()
    t_o, t_b, p_o, p_b = [], [], [], []
    for i in range(reps):
        dt, pk = timed(ours)
        t_o.append(dt)
        p_o.append(pk)
        if i < base_reps:
            dt, pk = timed(base)
            t_b.append(dt)
            p_b.append(pk)
    return statistics.median(t_o), statistics.median(t_b), max(p_o), max(p_b)


def record(case, impl, baseline, t, tb, p, pb, max_err, **extra):
    """The harness's record (peaks given in bytes), printed as one row."""
    rec = _harness.record(case, impl, baseline, t, tb, threads=torch.get_num_threads(), peak_mib=p / MIB,
                          baseline_peak_mib=pb / MIB if pb is not None else None, max_err=max_err, **extra)
    tb_s = f"{tb:9.4f}" if tb else "        -"
    sp = f"{rec['speedup']:7.1f}x" if tb else "       -"
    pb_s = f"{rec['baseline_peak_mib']:9.1f}" if pb is not None else "        -"
    err_s = f"err {max_err:.1e}" if max_err is not None else "err -"
    print(f"{case:48s} {t:9.4f} {tb_s} {sp} {rec['peak_mib']:9.1f} {pb_s}  {err_s}", flush=True)
    return rec


def inputs(s, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, s, H, D, generator=g).requires_grad_(grad) for _ in range(3)]


def fwd_bwd(fn, *args):
    def call():
        for t in args:
            t.grad = None
        fn(*args).sum().backward()
    return call


def sdpa_causal(q, k, v):
    # (B, S, H, D) -> (B, H, S, D) at the SDPA boundary only.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def causal_linear(q, k, v):
    return linear_attention(q, k, v, causal=True)


def check_causal(q, k, v) -> float:
    """Chunked causal against independent forms: the last row equals the non-causal output's,
    the final states agree, and a prefix agrees with the float64 naive form."""
    with torch.no_grad():
        out, (kv, z) = linear_attention(q, k, v, causal=True, output_final_state=True)
        full, (kv2, z2) = linear_attention(q, k, v, output_final_state=True)
        p = min(512, q.shape[1])
        naive = linear_attention(q[:, :p].double(), k[:, :p].double(), v[:, :p].double(), causal=True, form="naive")
        errs = [(out[:, -1] - full[:, -1]).abs().max(), (out[:, :p].double() - naive).abs().max(),
                (kv - kv2).abs().max() / kv2.abs().max(), (z - z2).abs().max() / z2.abs().max()]
    return max(e.item() for e in errs)


def causal_case(s, reps, base_reps):
    q, k, v = inputs(s)
    err = check_causal(q, k, v)
    if s <= 16384:  # how far the elu model is from softmax (a different model, not an error)
        with torch.no_grad():
            exact = sdpa_causal(q, k, v)
            dev = ((causal_linear(q, k, v) - exact).norm() / exact.norm()).item()
    else:
        dev = None
    t, tb, p, pb = compare(fwd_bwd(causal_linear, q, k, v), fwd_bwd(sdpa_causal, q, k, v), reps, base_reps)
    flops = 4 * B * H * s * s * D * 3.5 / 2  # what SDPA does: fwd + 2.5x bwd, halved for causal
    return record(f"linear-causal-fwdbwd-S{s}-fp32", "memattn.linear_attention(causal, chunked)",
                  "torch.sdpa(is_causal)", t, tb, p, pb, err, reps=reps, baseline_reps=base_reps,
                  baseline_gflops=flops / tb / 1e9, rel_dev_from_softmax=dev, peak_bytes_per_token=p / s)


def chunked_vs_noncausal(s, reps):
    q, k, v = inputs(s)
    with torch.no_grad():
        a = linear_attention(q, k, v, causal=True)[:, -1]
        b = linear_attention(q, k, v)[:, -1]
    noncausal = lambda q, k, v: linear_attention(q, k, v, causal=False)  # noqa: E731
    t, tb, p, pb = compare(fwd_bwd(causal_linear, q, k, v), fwd_bwd(noncausal, q, k, v), reps)
    return record(f"linear-chunked-vs-noncausal-fwdbwd-S{s}-fp32", "memattn.linear_attention(causal, chunked)",
                  "memattn.linear_attention(noncausal)", t, tb, p, pb, (a - b).abs().max().item(), reps=reps)


def decode_case(ctx, reps, tokens):
    q, k, v = inputs(ctx + tokens, grad=False, seed=1)
    with torch.no_grad():
        _, state = linear_attention(q[:, :ctx], k[:, :ctx], v[:, :ctx], causal=True, output_final_state=True)
    # The cache holds the context plus room for every token decoded in warm-up and timing.
    cap = ctx + tokens * (reps + 1)
    k_cache = torch.zeros(B, H, cap, D)
    v_cache = torch.zeros(B, H, cap, D)
    k_cache[:, :, :ctx] = k[:, :ctx].transpose(1, 2)
    v_cache[:, :, :ctx] = v[:, :ctx].transpose(1, 2)
    st = {"dec": LinearAttentionState(state), "len": ctx}

    def ours():
        dec = LinearAttentionState(state)  # every timed block continues the prefill from ctx tokens
        for t in range(ctx, ctx + tokens):
            dec.step(q[:, t], k[:, t], v[:, t])
        st["dec"] = dec

    def base():
        n = st["len"]
        with torch.no_grad():
            for i, t in enumerate(range(ctx, ctx + tokens)):
                k_cache[:, :, n + i] = k[:, t]
                v_cache[:, :, n + i] = v[:, t]
                F.scaled_dot_product_attention(q[:, t, :, None], k_cache[:, :, : n + i + 1],
                                               v_cache[:, :, : n + i + 1])
        st["len"] = n + tokens

    # Correctness: the decoded tokens equal the causal run over context + tokens.
    dec = LinearAttentionState(state)
    got = torch.stack([dec.step(q[:, t], k[:, t], v[:, t]) for t in range(ctx, ctx + tokens)], 1)
    with torch.no_grad():
        full = linear_attention(q, k, v, causal=True)[:, ctx:]
    err = (got - full).abs().max().item()
    t, tb, p, pb = compare(ours, base, reps)
    state_bytes = st["dec"].kv.numel() * 4 + st["dec"].z.numel() * 4
    return record(f"decode-ctx{ctx}", "memattn.LinearAttentionState.step", "sdpa+contiguous KV cache",
                  t / tokens, tb / tokens, p, pb, err, reps=reps, tokens_per_rep=tokens,
                  state_mib=state_bytes / MIB, kv_cache_mib=2 * ctx * B * H * D * 4 / MIB,
                  baseline_kv_read_gbps=2 * ctx * B * H * D * 4 / (tb / tokens) / 1e9)


def long_case(s):
    q, k, v = inputs(s)
    call = fwd_bwd(causal_linear, q, k, v)
    dt, peak = timed(call)
    return record(f"linear-causal-fwdbwd-S{s}-fp32", "memattn.linear_attention(causal, chunked)", None,
                  dt, None, peak, None, None, reps=1, peak_bytes_per_token=peak / s,
                  input_mib=3 * q.numel() * 4 / MIB)


def cases(quick: bool, long: bool, repeats: int | None) -> dict:
    """{case name: thunk -> record}, in run order. `repeats` (None: each case's default) sets the timed runs;
    the quadratic SDPA baseline keeps its cap."""
    def reps(default):
        return repeats or default

    def causal(s, n, base_cap):
        return lambda: causal_case(s, reps(n), min(reps(n), base_cap))
    name = "linear-causal-fwdbwd-S{}-fp32".format
    if quick:
        return {name(1024): causal(1024, 3, 3),
                "linear-chunked-vs-noncausal-fwdbwd-S2048-fp32": lambda: chunked_vs_noncausal(2048, reps(3)),
                "decode-ctx1024": lambda: decode_case(1024, reps(3), 16)}
    out = {name(4096): causal(4096, 5, 5),
           "linear-chunked-vs-noncausal-fwdbwd-S16384-fp32": lambda: chunked_vs_noncausal(16384, reps(7))}
    for ctx in (4096, 65536):
        out[f"decode-ctx{ctx}"] = lambda ctx=ctx: decode_case(ctx, reps(7), 32)
    out[name(16384)] = causal(16384, 5, 3)
    out[name(65536)] = causal(65536, 5, 1)
    if long:
        out[name(262144)] = lambda: long_case(262144)
    return out


def main(argv=None):
    ap = _harness.parser(__doc__, repeats=None, threads=1)
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--long", action="store_true", help="add the S=262144 training case")
    args = ap.parse_args(argv)
    print(f"{'case':48s} {'time_s':>9s} {'base_s':>9s} {'speedup':>8s} {'peak_MiB':>9s} {'base_MiB':>9s}")
    todo = cases(args.quick, args.long, args.repeats)
    recs = [todo[name]() for name in _harness.selected(todo, args.cases)]
    _harness.write_json(args.json, recs)


if __name__ == "__main__":
    main()
