"""gemv-*: the native few-row GEMV (``memattn.kernels.gemv.linear``, what a decode step of 1-8 rows runs its
projections with) against ``torch.nn.functional.linear`` on the same tensors.

    python benchmarks/gemv.py [--cases NAME] [--repeats 31] [--threads 2] [--json PATH]

Shapes: SmolLM2-135M's projections (qkv 576 -> 960, gate/up 576 -> 3072, down 1536 -> 576) and its LM head
(576 -> 49152: 113 MB in float32, larger than the last-level cache, so it measures the stream from memory), for
1, 2, 4 and 8 rows, float32 and bfloat16. Each case first checks both against float64 (the FlashAttention-style
bound: 2 x the baseline's own error, plus the float64 product's rounding to the dtype and eps x its magnitude),
then times them interleaved after a warm-up, median of ``--repeats``. Records carry ``weight_gbps`` (weight bytes / time).
"""
from __future__ import annotations

import torch

import _harness
from memattn.kernels import gemv

SHAPES = {"qkv": (960, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 2, 4, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def case_names():
    return [f"gemv-{tag}-{shape}-m{m}" for tag in DTYPES for shape in SHAPES for m in ROWS]


def run_case(name: str, repeats: int) -> dict:
    _, tag, shape, m = name.split("-")
    dt, (n, k), rows = DTYPES[tag], SHAPES[shape], int(m[1:])
    g = torch.Generator().manual_seed(rows * 7 + n + k)
    x = torch.randn(rows, k, generator=g).to(dt)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dt)
    ref = x.double() @ w.double().T
    ours, base = gemv.linear(x, w), torch.nn.functional.linear(x, w)
    err, base_err = (ours.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()
    # FlashAttention's rule: twice the baseline's error, plus the output's own rounding and an epsilon floor
    # scaled by the result's magnitude (not a fixed number: rounding differs from CPU to CPU)
    floor = torch.finfo(dt).eps * ref.abs().max().item()
    bound = 2 * base_err + (ref.to(dt).double() - ref).abs().max().item() + floor
    if not err <= bound:
        raise AssertionError(f"{name}: error {err:.3g} above the bound {bound:.3g}")
    t = _harness.interleaved_times({"ours": lambda: gemv.linear(x, w),
                                    "base": lambda: torch.nn.functional.linear(x, w)}, repeats, warmup=3)
    wbytes = w.numel() * w.element_size()
    return _harness.record(name, "memattn.kernels.gemv.linear", "torch.nn.functional.linear", t["ours"], t["base"],
                           max_err=err, baseline_max_err=base_err, rows=rows, n=n, k=k, dtype=tag,
                           weight_gbps=wbytes / t["ours"] / 1e9, baseline_weight_gbps=wbytes / t["base"] / 1e9,
                           reps=repeats, threads=torch.get_num_threads())


def main():
    p = _harness.parser(__doc__, repeats=31, threads=2)
    args = p.parse_args()
    records = [run_case(name, args.repeats) for name in _harness.selected(case_names(), args.cases)]
    _harness.print_records(records, extra_cols=("weight_gbps", "baseline_weight_gbps"))
    _harness.write_json(args.json, records)


if __name__ == "__main__":
    main()
