"""Dense exact attention: memattn (auto, blockwise) against torch SDPA on this CPU.

Cases {fwd|fwdbwd}-{causal-|}S{1024|4096|8192}-{fp32|bf16}, B=1, H=8, D=64; with --long also
fwdbwd-causal-S131072-fp32 (auto only; peak memory against the bytes of q, k, v, out and grads).
Throughput: GFLOP/s with 4*B*H*S*S*D for forward, x2.5 more for backward, halved for causal.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402

import memattn  # noqa: E402
from memattn import masks  # noqa: E402
from memattn.compare import rows_error  # noqa: E402
from memattn.memory import measure  # noqa: E402

B, H, D = 1, 8, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


def ours(method):
    return lambda q, k, v, causal: memattn.attention(q, k, v, causal=causal, method=method)


def flops(s, causal, backward):
    f = 4 * B * H * s * s * D * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def make_work(fn, q, k, v, causal, backward, dout):
    if not backward:
        return lambda: fn(q, k, v, causal)

    def step():
        fn(q, k, v, causal).backward(dout)
        q.grad = k.grad = v.grad = None
    return step


def run_case(s, dtype_name, causal, backward, impls, repeats):
    dtype = DTYPES[dtype_name]
    case = case_name(s, dtype_name, causal, backward)
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(B, s, H, D, generator=g).to(dtype).requires_grad_(backward) for _ in range(3))
    dout = torch.randn(B, s, H, D, generator=g).to(dtype)
    fns = {"torch.sdpa": sdpa, **{f"memattn.{m}": ours(m) for m in impls}}
    # correctness first: every impl against the float64 reference (first/last rows), and against SDPA
    mask = masks.causal() if causal else None
    errs = {}
    with torch.no_grad():
        base_out = sdpa(q, k, v, causal)
        for name, fn in fns.items():
            out = fn(q, k, v, causal)
            errs[name] = rows_error(out, q, k, v, mask)
            if name != "torch.sdpa":
                tol = 4 * errs["torch.sdpa"] + 1e-6
                if errs[name] > tol:
                    raise AssertionError(f"{case} {name}: error {errs[name]:.3e} > {tol:.3e}")
        del base_out
    works = {n: make_work(fn, q, k, v, causal, backward, dout) for n, fn in fns.items()}
    peaks = {n: measure(w) / 2**20 for n, w in works.items()}
    times = _harness.interleaved_times(works, repeats)
    recs = []
    for m in impls:
        name = f"memattn.{m}"
        recs.append(_harness.record(
            case, name, "torch.sdpa", times[name], times["torch.sdpa"], peak_mib=peaks[name],
            baseline_peak_mib=peaks["torch.sdpa"], max_err=errs[name], baseline_max_err=errs["torch.sdpa"],
            gflops=flops(s, causal, backward) / times[name] / 1e9,
            baseline_gflops=flops(s, causal, backward) / times["torch.sdpa"] / 1e9, reps=repeats))
    return recs


def run_memory(s=16384):
    """fwdbwd-S{s}-fp32 peak memory only (one measured run each): blockwise and auto against SDPA."""
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(B, s, H, D, generator=g).requires_grad_(True) for _ in range(3))
    dout = torch.randn(B, s, H, D, generator=g)
    peaks = {name: measure(make_work(fn, q, k, v, False, True, dout)) / 2**20
             for name, fn in (("torch.sdpa", sdpa), ("memattn.blockwise", ours("blockwise")),
                              ("memattn.auto", ours("auto")))}
    return [_harness.record(f"fwdbwd-S{s}-fp32-memory", name, "torch.sdpa", None, None, peak_mib=peaks[name],
                            baseline_peak_mib=peaks["torch.sdpa"], peak_ratio=peaks[name] / peaks["torch.sdpa"])
            for name in ("memattn.blockwise", "memattn.auto")]


def run_long(repeats):
    """fwdbwd-causal-S131072-fp32, auto only: one timed run and its measured peak."""
    s = 131072
    case = f"fwdbwd-causal-S{s}-fp32"
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(B, s, H, D, generator=g).requires_grad_(True) for _ in range(3))
    dout = torch.randn(B, s, H, D, generator=g)
    work = make_work(ours("auto"), q, k, v, True, True, dout)
    t0 = time.perf_counter()
    peak = measure(work)
    elapsed = time.perf_counter() - t0
    tensor_bytes = q.numel() * q.element_size()
    io_bytes = 8 * tensor_bytes  # q, k, v, out, dout... counted as q, k, v, out and their gradients
    with torch.no_grad():
        err = rows_error(memattn.attention(q, k, v, causal=True), q, k, v, masks.causal())
    return [_harness.record(case, "memattn.auto", None, elapsed, None, peak_mib=peak / 2**20,
                            io_mib=io_bytes / 2**20, peak_over_io=peak / io_bytes, max_err=err,
                            gflops=flops(s, True, True) / elapsed / 1e9, reps=1)]


def case_name(s, dtype_name, causal, backward):
    return f"{'fwdbwd' if backward else 'fwd'}-{'causal-' if causal else ''}S{s}-{dtype_name}"


def main():
    p = _harness.parser(__doc__)
    p.add_argument("--long", action="store_true", help="also run fwdbwd-causal-S131072-fp32 (minutes)")
    p.add_argument("--seq-lens", default="1024,4096,8192")
    args = p.parse_args()
    recs = []
    for dtype_name in ("fp32", "bf16"):
        for s in [int(x) for x in args.seq_lens.split(",")]:
            for backward in (False, True):
                for causal in (False, True):
                    if not _harness.wants(case_name(s, dtype_name, causal, backward), args.cases):
                        continue
                    recs += run_case(s, dtype_name, causal, backward, ["auto", "blockwise"], args.repeats)
                    _harness.print_records(recs[-2:], ("gflops", "baseline_gflops"))
    if _harness.wants("fwdbwd-S16384-fp32-memory", args.cases):
        recs += run_memory()
        _harness.print_records(recs[-2:], ("peak_ratio",))
    if args.long and _harness.wants("fwdbwd-causal-S131072-fp32", args.cases):
        recs += run_long(args.repeats)
        _harness.print_records(recs[-1:], ("peak_over_io", "gflops"))
    print()
    _harness.print_records(recs, ("gflops", "baseline_gflops"))
    _harness.write_json(args.json, recs)


if __name__ == "__main__":
    main()
