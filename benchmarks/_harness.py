"""Shared benchmark machinery (DESIGN.md's format): interleaved timing, medians, records, output.

Each benchmark script checks correctness first, then times ours against the baseline in the
same run, interleaved (A B A B ...) after a warm-up, and reports the median.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", default=None, metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per impl (median reported, >= 5)")
    p.add_argument("--only", default=None, help="run only cases whose name contains this text")
    return p


def interleaved_times(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall time of each callable, run interleaved A B A B ... after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> dict:
    return {"machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def record(case, impl, baseline, time_s, baseline_time_s, **extra) -> dict:
    rec = {"case": case, "impl": impl, "baseline": baseline, "time_s": time_s, "baseline_time_s": baseline_time_s,
           "speedup": (baseline_time_s / time_s) if (time_s and baseline_time_s) else None}
    rec.update(extra)
    return rec


def print_records(records, extra_cols=()):
    cols = ["case", "impl", "baseline", "time_s", "baseline_time_s", "speedup", "peak_mib", "baseline_peak_mib",
            "max_err", *extra_cols]
    rows = [[_fmt(r.get(c)) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    sys.stdout.flush()


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def write_json(path, records):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump([dict(r, **machine()) for r in records], f, indent=1)
    print(f"wrote {path}")
