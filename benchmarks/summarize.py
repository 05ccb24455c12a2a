"""Render the records in benchmarks/results/*.json as Markdown tables (pasted into BENCHMARKS.md).

    python benchmarks/summarize.py [results/dense.json ...]
"""
from __future__ import annotations

import glob
import json
import os
import sys

COLUMNS = ["case", "impl", "baseline", "time_s", "baseline_time_s", "speedup", "peak_mib", "baseline_peak_mib",
           "max_err"]
EXTRA = ["gflops", "baseline_gflops", "useful_gflops", "compile_s", "kv_gbps", "copy_gbps", "threads", "peak_ratio",
         "peak_over_io", "imbalance", "reps"]


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, list):
        return ",".join(map(str, x))
    return str(x)


def table(records):
    extra = [c for c in EXTRA if any(c in r for r in records)]
    cols = COLUMNS + extra
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(paths):
    here = os.path.dirname(os.path.abspath(__file__))
    paths = paths or sorted(glob.glob(os.path.join(here, "results", "*.json")))
    for p in paths:
        with open(p) as f:
            recs = json.load(f)
        if recs and isinstance(recs[0], dict) and "case" in recs[0]:
            print(f"### {os.path.basename(p)}\n\n{table(recs)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
