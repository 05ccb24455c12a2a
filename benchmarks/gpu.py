"""GPU benchmark (issue 8): memattn's Triton paths against SDPA (flash backend) and compiled FlexAttention.

Self-contained: needs a CUDA device, torch and triton (``pip install -e '.[gpu]'``). It checks
correctness first (small shapes against float64 attention), then times, interleaved (A B A B ...)
after a warm-up, the median of ``--repeats`` runs:

- dense and causal, forward and forward+backward, S in {4096, 16384}, bf16, B=4, H=16, D=128:
  ``memattn.attention(method="blockwise")`` (Triton tiles) vs SDPA's flash backend;
- sliding window 1024 (causal) at the same sizes: memattn vs compiled FlexAttention;
- paged decode, 64 sequences of context 8192 (block size 16, H=32 query / 8 kv heads, D=128):
  memattn's Triton decode kernel as GB/s of KV read, vs the card's measured device-to-device copy bandwidth.

Takes the harness's flags (``--cases``, ``--repeats``, ``--threads``, ``--json``); without CUDA it says so and
exits 0, having run nothing. Prints a table; ``--json PATH`` writes records in DESIGN.md's format. Targets: dense fwd >= 0.7x SDPA,
fwd+bwd >= 0.6x; window-1024 at S=16384 >= 1.0x Flex; paged decode >= 0.7x copy bandwidth.
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

from memattn.memory import measure_call  # noqa: E402


def _args():
    p = _harness.parser(__doc__)
    p.add_argument("--seqlens", default="4096,16384", help="comma-separated S for the prefill cases")
    return p.parse_args()


def _cuda_time(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per callable, interleaved, timed with CUDA events."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(max(5, repeats)):
        for name, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b) / 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _bhsd(x):
    return x.transpose(1, 2)


def _sdpa(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return _bhsd(torch.nn.functional.scaled_dot_product_attention(_bhsd(q), _bhsd(k), _bhsd(v), is_causal=causal))


def _flex_window(s, window, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (qi - kj <= window)
    bm = create_block_mask(mask_mod, None, None, s, s, device=device)
    return lambda q, k, v: _bhsd(flex(_bhsd(q), _bhsd(k), _bhsd(v), block_mask=bm))


def check_correctness(device):
    """Small shapes against float64 attention: dense, causal, window, GQA, varlen-free; paged decode."""
    import memattn
    from memattn import reference
    from memattn.ops.spec import build_spec
    worst = 0.0
    g = torch.Generator(device="cpu").manual_seed(0)
    for causal, window, dtype in ((False, (-1, -1), torch.bfloat16), (True, (-1, -1), torch.float16),
                                  (True, (100, 0), torch.float32)):
        q = torch.randn(2, 300, 8, 59, generator=g)
        k, v = torch.randn(2, 300, 2, 59, generator=g), torch.randn(2, 300, 2, 59, generator=g)
        qd, kd, vd = (t.to(device, dtype).requires_grad_(True) for t in (q, k, v))
        out = memattn.attention(qd, kd, vd, causal=causal, window_size=window, method="blockwise")
        spec = build_spec(q.shape, k.shape[1], causal=causal, softmax_scale=None, key_padding_mask=None, window_size=window)
        mask = None if spec.mask is None else spec.mask.dense(300, 300)
        q64, k64, v64 = (t.to(dtype).double().requires_grad_(True) for t in (q, k, v))
        ref = reference.attention(q64, k64, v64, mask=mask)
        err = (out.double().cpu() - ref).abs().max().item()
        cot = torch.randn(out.shape, generator=g)
        gq = torch.autograd.grad((out.float() * cot.to(device)).sum(), (qd, kd, vd))
        rg = torch.autograd.grad((ref * cot.double()).sum(), (q64, k64, v64))
        gerr = max((a.double().cpu() - b).abs().max().item() for a, b in zip(gq, rg))
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        if not (err < tol and gerr < 10 * tol):
            sys.exit(f"correctness FAILED: causal={causal} window={window} {dtype}: out err {err:.3e}, grad err {gerr:.3e}")
        worst = max(worst, err)
    from memattn.ops.paged import paged_attention_reference
    kc = torch.randn(64, 16, 2, 128, generator=g).to(torch.bfloat16)
    vc = torch.randn(64, 16, 2, 128, generator=g).to(torch.bfloat16)
    table = torch.randperm(64, generator=g)[:60].reshape(3, 20).to(torch.int32)
    lens = torch.tensor([1, 200, 320], dtype=torch.int32)
    q = torch.randn(3, 1, 8, 128, generator=g).to(torch.bfloat16)
    out = memattn.paged_attention(q.to(device), kc.to(device), vc.to(device), table.to(device), lens.to(device))
    ref = paged_attention_reference(q.double(), kc.double(), vc.double(), table, lens)
    err = (out.double().cpu() - ref).abs().max().item()
    if err > 2e-2:
        sys.exit(f"correctness FAILED: paged decode err {err:.3e}")
    return max(worst, err)


def bench_prefill(device, seqlens, repeats, cases):
    import memattn
    recs = []
    b, h, d = 4, 16, 128
    for s in seqlens:
        q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16) for _ in range(3))
        for name, causal, window in (("dense", False, -1), ("causal", True, -1), ("window1024", True, 1024)):
            for mode in ("fwd", "fwdbwd"):
                case = f"{name}-{mode}-S{s}-bf16"
                if not _harness.wants(case, cases):
                    continue
                if window > 0:
                    base_name, base = "flex.compiled", _flex_window(s, window, device)
                else:
                    base_name, base = "torch.sdpa.flash", (lambda q, k, v, c=causal: _sdpa(q, k, v, c))

                def ours(q, k, v, c=causal, w=window):
                    return memattn.attention(q, k, v, causal=c, window_size=(w, 0) if w > 0 else (-1, -1),
                                             method="blockwise")
                if mode == "fwd":
                    fns = {"ours": lambda: ours(q, k, v), "base": lambda: base(q, k, v)}
                    ctx = torch.no_grad
                else:
                    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
                    dout = torch.randn_like(q)
                    fns = {"ours": lambda: ours(qg, kg, vg).backward(dout), "base": lambda: base(qg, kg, vg).backward(dout)}
                    ctx = torch.enable_grad
                with ctx():
                    with torch.no_grad():
                        err = (ours(q, k, v).float() - base(q, k, v).float()).abs().max().item()
                    t = _cuda_time(fns, repeats)
                    peaks = {n: measure_call(f, device=device).peak_mib for n, f in fns.items()}
                visible = s * s if not causal else s * (s + 1) / 2
                if window > 0:
                    visible = sum(min(i + 1, window + 1) for i in range(s))
                flops = 4 * b * h * visible * d * (1 if mode == "fwd" else 3.5)
                recs.append(_harness.record(case, "memattn.triton", base_name, t["ours"], t["base"],
                                            tflops=flops / t["ours"] / 1e12, baseline_tflops=flops / t["base"] / 1e12,
                                            peak_mib=peaks["ours"], baseline_peak_mib=peaks["base"], max_err=err))
                print(_row(recs[-1]), flush=True)
    return recs


def bench_paged(device, repeats, cases):
    import memattn
    case = "paged-decode-B64-ctx8192-bf16"
    if not _harness.wants(case, cases):
        return []
    nseq, ctx, page, h, hkv, d = 64, 8192, 16, 32, 8, 128
    per = ctx // page
    kc = torch.randn(nseq * per, page, hkv, d, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.randperm(nseq * per, device=device).to(torch.int32).reshape(nseq, per)
    lens = torch.full((nseq,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(nseq, 1, h, d, device=device, dtype=torch.bfloat16)
    kv_bytes = 2 * kc.numel() * kc.element_size()
    dst = torch.empty_like(kc)
    fns = {"ours": lambda: memattn.paged_attention(q, kc, vc, table, lens),
           "copy": lambda: dst.copy_(kc)}
    t = _cuda_time(fns, repeats)
    ours_gbs = kv_bytes / t["ours"] / 1e9
    copy_gbs = 2 * kc.numel() * kc.element_size() / t["copy"] / 1e9  # read + write
    rec = _harness.record(case, "memattn.triton.paged_decode", "device copy bandwidth", t["ours"], t["copy"],
                          speedup=ours_gbs / copy_gbs, gbs=ours_gbs, copy_gbs=copy_gbs)
    print(_row(rec), flush=True)
    return [rec]


def _row(r):
    extra = f"{r['tflops']:8.1f} {r['baseline_tflops']:8.1f} TFLOP/s" if "tflops" in r else \
        f"{r['gbs']:8.1f} {r['copy_gbs']:8.1f} GB/s   "
    return f"{r['case']:34s} {r['time_s'] * 1e3:10.2f} {r['baseline_time_s'] * 1e3:10.2f} ms  {extra}  x{r['speedup']:.2f}"


def main():
    args = _args()
    if not torch.cuda.is_available():  # not a failure: ab.py and scripts that run every benchmark go on
        print("benchmarks/gpu.py needs a CUDA device (none found); nothing was run.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/gpu.py needs triton: pip install -e '.[gpu]'")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}")
    err = check_correctness(device)
    print(f"correctness ok (max err {err:.2e})")
    print(f"{'case':34s} {'memattn':>10s} {'baseline':>10s}      {'ours':>8s} {'base':>8s}")
    recs = bench_prefill(device, [int(s) for s in args.seqlens.split(",")], args.repeats, args.cases)
    recs += bench_paged(device, args.repeats, args.cases)
    for r in recs:
        r["device"] = name
    _harness.write_json(args.json, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
