"""Same-process A/B of the fused CPU tile wrapper (issue 15's guards), with an A/A control.

    python benchmarks/guards_ab.py --baseline OLD_CPU_FLASH_PY [--repeats 41] [--threads 2] [--json PATH]

B is this tree's guarded ``kernels/cpu_flash.py``; A is another tree's copy of that file (the commit before the
guards: ``git show 5a0b090^:src/memattn/kernels/cpu_flash.py > /tmp/cpu_flash_unguarded.py``), loaded as a
module of its own. A second load of the same A file (A2) is timed as a third variant: A2 / A is what the machine's
own drift looks like on that case, so a guard ratio B / A is only read as a slowdown when it lies outside the
spread of the control ratios.

Per case (dense.py's shapes: B=1, H=8, D=64; S 1024 and 2048; float32 and bfloat16; causal or not; forward, and
forward+backward) the three variants run in a rotating order each repetition (A B A2, B A2 A, A2 A B, ...), so none
always runs first after a cache-cold step; the medians are reported. Records (DESIGN.md's format): impl
"guarded", baseline "unguarded", ``speedup`` = A / B (< 1: the guards cost time), ``control_ratio`` = A / A2.
"""
from __future__ import annotations

import importlib.util
import statistics
import time

import torch

import _harness
import memattn
from memattn.kernels import cpu_flash


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(f"memattn.kernels.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tile_forward, mod.tile_backward


def _use(fns):
    cpu_flash.tile_forward, cpu_flash.tile_backward = fns


def _rotating_medians(variants: dict, run, repeats: int) -> dict:
    """Median time of `run` under each variant (tile function pair), the order rotated every repetition."""
    names = list(variants)
    for name in names:  # warm-up
        _use(variants[name]); run()
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            _use(variants[name])
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    p = _harness.parser(__doc__, repeats=41, threads=2)
    p.add_argument("--baseline", required=True, metavar="PATH", help="the unguarded kernels/cpu_flash.py")
    args = p.parse_args()
    guarded = (cpu_flash.tile_forward, cpu_flash.tile_backward)
    variants = {"A": _load(args.baseline, "_unguarded_a"), "B": guarded, "A2": _load(args.baseline, "_unguarded_a2")}
    records = []
    try:
        for s in (1024, 2048):
            for dt in (torch.float32, torch.bfloat16):
                for causal in (False, True):
                    for bwd in (False, True):
                        name = (f"{'fwdbwd' if bwd else 'fwd'}-{'causal-' if causal else ''}S{s}-"
                                f"{'fp32' if dt == torch.float32 else 'bf16'}")
                        if not _harness.wants(name, args.cases):
                            continue
                        g = torch.Generator().manual_seed(s)
                        q, k, v = (torch.randn(1, s, 8, 64, generator=g).to(dt).requires_grad_(bwd) for _ in range(3))

                        def run():
                            o = memattn.attention(q, k, v, causal=causal)
                            if bwd:
                                o.sum().backward()

                        t = _rotating_medians(variants, run, args.repeats)
                        records.append(_harness.record(name, "guarded", "unguarded", t["B"], t["A"],
                                                       control_ratio=t["A"] / t["A2"], control_time_s=t["A2"],
                                                       repeats=args.repeats))
                        print(f"{name:<26} A {t['A'] * 1e3:8.1f} ms  B {t['B'] * 1e3:8.1f} ms  "
                              f"A/B {t['A'] / t['B']:6.3f}  control A/A2 {t['A'] / t['A2']:6.3f}", flush=True)
    finally:
        _use(guarded)
    if records:
        sp = [r["speedup"] for r in records]
        ctl = [r["control_ratio"] for r in records]
        print(f"geomean speedup {statistics.geometric_mean(sp):.4f}  worst {min(sp):.3f}  "
              f"control spread {min(ctl):.3f}-{max(ctl):.3f}")
    _harness.write_json(args.json, records)


if __name__ == "__main__":
    main()
