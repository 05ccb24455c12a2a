"""Run the fuzzer: ``python -m fuzz.runner [--profile quick|long] [--entries a,b] [--json PATH]`` from tests/
(``make fuzz`` runs the long profile). Prints, per entry point: cases tried, crashes, wrong answers, unclear
errors, and the first falsifying example of each kind; writes the same as JSON with --json.

``--replay ENTRY 'CASE'`` runs one case (a dict as printed) in a worker and prints its outcome.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings

from .contract import CRASH, KINDS, OK, UNCLEAR, WRONG
from .worker import Worker


def run_entry(worker: Worker, entry, examples: int, seed: int = 0, time_budget_s: float | None = None) -> dict:
    """Draw `examples` cases of `entry` (generation only: failures are recorded, not shrunk) and run each in
    the worker. Returns {"entry", "cases", "crash", "wrong", "unclear", "seconds", "examples": {kind: [...]}}."""
    counts = dict.fromkeys(KINDS, 0)
    examples_of = {k: [] for k in KINDS if k != OK}
    start = time.perf_counter()

    @hyp_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=entry.cases)
    def body(case):
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            return
        kind, msg = worker.run(entry.name, case)
        counts[kind] += 1
        if kind != OK and len(examples_of[kind]) < 5:
            examples_of[kind].append({"case": case, "message": msg[:2000]})

    body()
    return {"entry": entry.name, "cases": sum(counts.values()), "crash": counts[CRASH], "wrong": counts[WRONG],
            "unclear": counts[UNCLEAR], "seconds": round(time.perf_counter() - start, 1), "examples": examples_of}


def format_row(r: dict) -> str:
    return f"{r['entry']:<34} {r['cases']:>6} {r['crash']:>7} {r['wrong']:>6} {r['unclear']:>8} {r['seconds']:>8.1f}"


HEADER = f"{'entry point':<34} {'cases':>6} {'crashes':>7} {'wrong':>6} {'unclear':>8} {'seconds':>8}"


def failures_text(r: dict) -> str:
    lines = []
    for kind, exs in r["examples"].items():
        for ex in exs[:2]:
            lines.append(f"  {kind}: {r['entry']} {ex['case']!r}\n    {ex['message']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .entries import ENTRIES
    p = argparse.ArgumentParser(prog="python -m fuzz.runner", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=("quick", "long"), default="long")
    p.add_argument("--entries", default="", help="comma-separated entry names (default: all)")
    p.add_argument("--examples", type=int, default=None, help="examples per entry (default: the profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the per-entry figures here")
    p.add_argument("--replay", nargs=2, metavar=("ENTRY", "CASE"))
    args = p.parse_args(argv)
    worker = Worker()
    try:
        if args.replay:
            name, case = args.replay
            print(worker.run(name, ast.literal_eval(case)))
            return 0
        names = [n for n in args.entries.split(",") if n] or list(ENTRIES)
        unknown = [n for n in names if n not in ENTRIES]
        if unknown:
            p.error(f"unknown entries {unknown}; choose from {list(ENTRIES)}")
        results = []
        print(HEADER, flush=True)
        for n in names:
            e = ENTRIES[n]
            count = args.examples or (e.quick if args.profile == "quick" else e.long)
            r = run_entry(worker, e, count, seed=args.seed)
            results.append(r)
            print(format_row(r), flush=True)
            if r["crash"] or r["wrong"] or r["unclear"]:
                print(failures_text(r), flush=True)
        total = {k: sum(r[k] for r in results) for k in ("cases", "crash", "wrong", "unclear")}
        print(f"{'total':<34} {total['cases']:>6} {total['crash']:>7} {total['wrong']:>6} {total['unclear']:>8}")
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"profile": args.profile, "seed": args.seed, "entries": results, "total": total}, f,
                          indent=1, default=repr)
        return 0 if not (total["crash"] or total["wrong"] or total["unclear"]) else 1
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
