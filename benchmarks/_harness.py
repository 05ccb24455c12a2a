"""Shared benchmark machinery (DESIGN.md's format): common flags, interleaved timing, medians, records, output.

Each benchmark script checks correctness first, then times ours against the baseline in the
same run, interleaved (A B A B ...) after a warm-up, and reports the median.

Every script builds its command line with ``parser()``, which gives the four common flags:

- ``--cases A,B`` (or ``--cases A B``): run only the cases whose name contains one of these texts
  (``selected``/``wants`` apply it); ``--only TEXT`` is its deprecated alias;
- ``--repeats N``: timed runs per implementation (the median is reported);
- ``--threads N``: torch intra-op threads, applied by ``parse_args`` itself so no script can forget it
  (0 or absent: torch's default); a script that sweeps thread counts asks for ``thread_sweep=True`` and
  gets the list (``--threads 2 1``);
- ``--json PATH``: write the records (``record``) as a JSON list, each with the machine's fields.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import sys
import time

import torch


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose ``parse_args`` also applies the common flags (threads, the --only alias)."""

    thread_sweep = False

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        if ns.only is not None:
            print("--only is deprecated: use --cases", file=sys.stderr)
            ns.cases = (ns.cases or []) + [ns.only]
        if self.thread_sweep:  # the script runs each count in turn and sets it itself
            return ns
        if isinstance(ns.threads, list):
            if len(ns.threads) > 1:
                self.error("--threads takes one count in this script")
            ns.threads = ns.threads[0]
        if ns.threads:
            torch.set_num_threads(ns.threads)
        return ns


class _ExtendSplit(argparse.Action):
    """Collect values given as several arguments and/or comma-separated ones, in order."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = [x for v in values for x in v.split(",") if x]
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + items)


def parser(description: str, *, repeats: int = 5, threads: int | list | None = None,
           thread_sweep: bool = False) -> argparse.ArgumentParser:
    """The common flags; `repeats` and `threads` are the script's defaults. With thread_sweep, ``args.threads``
    is a list of counts the script runs in turn (and applies itself); else one count, already applied."""
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.thread_sweep = thread_sweep
    p.add_argument("--cases", nargs="+", action=_ExtendSplit, default=None, metavar="NAME",
                   help="run only the cases whose name contains one of these (comma- or space-separated)")
    p.add_argument("--only", default=None, help="deprecated alias of --cases (one text)")
    p.add_argument("--repeats", type=int, default=repeats,
                   help="timed runs per impl, the median reported (default "
                        + (f"{repeats})" if repeats is not None else "per case)"))
    p.add_argument("--threads", type=int, nargs="+", default=threads, metavar="N",
                   help="torch intra-op threads (0: torch's default)"
                        + ("; several: run the cases with each count in turn" if thread_sweep else ""))
    p.add_argument("--json", default=None, metavar="PATH", help="write the records as a JSON list")
    return p


def selected(names, cases) -> list:
    """The names that --cases selects (all of them when `cases` is None), in their order."""
    return [n for n in names if wants(n, cases)]


def wants(name: str, cases) -> bool:
    """Whether --cases (a list of texts, or None for every case) selects the case `name`."""
    return cases is None or any(c in name for c in cases)


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
    return {"machine": platform.machine(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's name: /proc/cpuinfo's "model name" on Linux, else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or "unknown")


def record(case, impl, baseline, time_s, baseline_time_s, *, speedup=None, **extra) -> dict:
    """One record in DESIGN.md's format; speedup defaults to baseline_time_s / time_s (> 1: we are faster)."""
    if speedup is None and time_s and baseline_time_s:
        speedup = baseline_time_s / time_s
    rec = {"case": case, "impl": impl, "baseline": baseline, "time_s": time_s, "baseline_time_s": baseline_time_s,
           "speedup": speedup}
    rec.update(extra)
    return rec


def print_records(records, extra_cols=()):
    print_table(records, ["case", "impl", "baseline", "time_s", "baseline_time_s", "speedup", "peak_mib",
                          "baseline_peak_mib", "max_err", *extra_cols])


def print_table(records, cols):
    """The records' `cols` as aligned text columns (missing fields as -)."""
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
    """Write the records with the machine's fields (a record's own field, e.g. its threads, wins)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump([{**r, **{k: v for k, v in machine().items() if k not in r}} for r in records], f, indent=1)
    print(f"wrote {path}")
