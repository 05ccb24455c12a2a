"""Ring attention on P = 1, 2, 4 gloo ranks vs single-process memattn attention on the full sequence.

    python benchmarks/ring.py [--json PATH] [--seqlens 16384 65536] [--reps 2] [--ranks 1 2 4]
                              [--masks causal full] [--layouts zigzag contiguous]

Cases ``ring-{causal-|}fwdbwd-S{S}-P{P}-fp32`` (zigzag layout; at S <= 16384 the contiguous
layout is run for causal cases too, to show its imbalance; above it only P = 2, 4, one run). The flags
pick a subset (for development: ``--seqlens 16384 --ranks 2 --masks causal --layouts zigzag --reps 1``).
One spawn of max(--ranks) ranks on 127.0.0.1 serves every case: smaller P run on sub-groups of
ranks 0..P-1 while the other ranks wait at a barrier, and the baseline runs on
rank 0 with 2 threads between ring runs (interleaved A B A B). Ring ranks use max(1, 2 // P)
threads: the machine has 2 cores.

Per rank we measure: fwd+bwd wall time, compute time (wall time minus time blocked in ring
waits; the benchmark wraps the ring's wait to count it), and peak memory (torch profiler memory
events, running sum, relative to the start of the call). ``time_s`` is the slowest rank's time,
``peak_mib`` the largest per-rank peak, ``imbalance`` = max / min per-rank compute time - 1.
Correctness first: every rank checks its shard of out/dq/dk/dv against the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import memattn
import memattn.distributed as md
from memattn.distributed import comm as ring_comm

B, H, D = 1, 2, 32
# One fwd+bwd at S = 65536 takes minutes on 2 shared cores: above SHORT only P = 2, 4 (zigzag) run, once.
SHORT, LONG_RANKS = 16384, (2, 4)


def _flops(s, causal):
    f = 4 * B * H * s * s * D * 3.5  # forward + backward (x2.5)
    return f / 2 if causal else f


class _WaitClock:
    """Counts seconds spent blocked in the ring's waits (wraps ``_Pending.wait``)."""

    def __init__(self):
        self.seconds = 0.0
        original = ring_comm._Pending.wait

        def timed(pending):
            t = time.perf_counter()
            try:
                return original(pending)
            finally:
                self.seconds += time.perf_counter() - t
        ring_comm._Pending.wait = timed


def _peak_mib(prof) -> float:
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def _fwdbwd(fn, q, k, v, dout, profile):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(q, k, v)
            out.backward(dout)
        return out.detach(), (q.grad, k.grad, v.grad), _peak_mib(prof)
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), (q.grad, k.grad, v.grad), None


def _inputs(s, causal_seed):
    gen = torch.Generator().manual_seed(causal_seed)
    return [torch.randn(B, s, h, D, generator=gen) for h in (H, H, H, H)]


def _run_case(rank, s, causal, reps, groups, clock, ranks, layouts):
    """Rows for one (S, causal): baseline and ring at P in `ranks`, interleaved; rank 0 returns records."""
    q, k, v, dout = _inputs(s, 1234 + s)
    shards, results = {}, {}
    base = {"time": [], "peak": None, "out": None}
    long = s > SHORT
    configs = [(p, "zigzag") for p in ranks if p in LONG_RANKS or not long] if "zigzag" in layouts else []
    configs += [(p, "contiguous") for p in ranks if p > 1] if causal and not long and "contiguous" in layouts else []
    for p, layout in configs:
        if rank < p:
            g = groups[p]
            shards[p, layout] = [md.shard(t, g, layout) for t in (q, k, v, dout)]
        results[p, layout] = {"time": [], "compute": [], "peak": None, "err": None}
    for rep in range(reps):
        profile = rep == 0  # warm-up, memory and correctness; timed too only when it is the one run
        timed = reps == 1 or rep > 0
        dist.barrier()
        if rank == 0:  # baseline: the whole sequence in one process, both cores
            torch.set_num_threads(2)
            t = time.perf_counter()
            out, grads, peak = _fwdbwd(lambda a, b_, c: memattn.attention(a, b_, c, causal=causal), q, k, v, dout,
                                       profile)
            if timed:
                base["time"].append(time.perf_counter() - t)
            if profile:
                base["peak"], base["out"] = peak, (out, *grads)
        dist.barrier()
        for p, layout in configs:
            res = results[p, layout]
            if rank < p:
                torch.set_num_threads(max(1, 2 // p))
                g = groups[p]
                ql, kl, vl, dl = shards[p, layout]
                dist.barrier(g)
                clock.seconds = 0.0
                t = time.perf_counter()
                out, grads, peak = _fwdbwd(lambda a, b_, c: md.ring_attention(a, b_, c, group=g, causal=causal,
                                                                              layout=layout), ql, kl, vl, dl, profile)
                wall = time.perf_counter() - t
                stats = torch.tensor([wall, wall - clock.seconds, peak or 0.0, 0.0], dtype=torch.float64)
                if profile:  # correctness: this rank's shard of the baseline (computed on rank 0)
                    stats[3] = _shard_error(rank, p, g, layout, (out, *grads), base["out"] if rank == 0 else None)
                gathered = [torch.zeros_like(stats) for _ in range(p)]
                dist.all_gather(gathered, stats, group=g)
                if rank == 0:
                    rows = torch.stack(gathered)
                    if timed:
                        res["time"].append(rows[:, 0].max().item())
                        res["compute"].append(rows[:, 1].tolist())
                    if profile:
                        res["peak"], res["err"] = rows[:, 2].tolist(), rows[:, 3].max().item()
            dist.barrier()
    if rank != 0:
        return []
    records = []
    bt = statistics.median(base["time"])
    for (p, layout), res in results.items():
        t = statistics.median(res["time"])
        per_rank = [statistics.median(c[r] for c in res["compute"]) for r in range(p)]
        name = f"ring-{'causal-' if causal else ''}fwdbwd-S{s}-P{p}-fp32" + ("" if layout == "zigzag" else "-contiguous")
        records.append({
            "case": name, "impl": f"memattn.distributed.ring_attention({layout})",
            "baseline": "memattn.attention (1 process, 2 threads)",
            "time_s": t, "baseline_time_s": bt, "speedup": bt / t,
            "peak_mib": max(res["peak"]), "baseline_peak_mib": base["peak"],
            "peak_ratio": max(res["peak"]) / base["peak"], "max_err": res["err"],
            "gflops": _flops(s, causal) / t / 1e9, "baseline_gflops": _flops(s, causal) / bt / 1e9,
            "ranks": p, "layout": layout, "threads_per_rank": max(1, 2 // p),
            "per_rank_peak_mib": res["peak"], "per_rank_compute_s": per_rank,
            "imbalance": max(per_rank) / min(per_rank) - 1, "reps": len(res["time"]),
            "B": B, "H": H, "D": D, "S": s, "causal": causal,
        })
    return records


def _shard_error(rank, p, group, layout, ours, base):
    """max |ours - shard(baseline)| over out, dq, dk, dv; the baseline lives on rank 0, sent by broadcast."""
    err = 0.0
    for i, x in enumerate(ours):
        full_shape = (x.shape[0], x.shape[1] * p, *x.shape[2:])
        full = base[i] if rank == 0 else torch.empty(full_shape)
        dist.broadcast(full, dist.get_global_rank(group, 0), group=group)
        err = max(err, (x - md.shard(full, group, layout)).abs().max().item())
    return err


def _worker(rank, port, seqlens, reps, json_path, ranks, masks, layouts):
    world = max(ranks)
    md.init_process_group("gloo", timeout_s=1800, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=world)
    groups = {p: dist.new_group(list(range(p))) for p in ranks}  # every rank makes every group, in order
    clock = _WaitClock()
    records = []
    for s in seqlens:
        for causal in [m == "causal" for m in masks]:
            new = _run_case(rank, s, causal, reps + 1 if s <= SHORT else 1, groups, clock, ranks, layouts)
            records += new
            if rank == 0:
                _print(new)
            if rank == 0 and json_path:  # after every case, so a long run keeps what it measured
                os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
                with open(json_path, "w") as f:
                    json.dump(records, f, indent=1)
    dist.destroy_process_group()


def _print(records):
    for r in records:
        print(f"{r['case']:<44} ring {r['time_s']:7.2f}s  base {r['baseline_time_s']:7.2f}s  "
              f"speedup {r['speedup']:.2f}  peak/rank {r['peak_mib']:7.1f} MiB  base {r['baseline_peak_mib']:7.1f} MiB "
              f"({r['peak_ratio']:.2f}x)  imbalance {100 * r['imbalance']:5.1f}%  err {r['max_err']:.1e}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--reps", type=int, default=2, help="timed runs per case at S <= 16384, after a profiled one (above: the profiled run only)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 4])
    ap.add_argument("--masks", nargs="+", default=["causal", "full"], choices=["causal", "full"])
    ap.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"], choices=list(md.LAYOUTS),
                    help="contiguous runs only for causal cases at S <= 16384")
    args = ap.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = sorted(set(args.ranks))
    mp.spawn(_worker, args=(port, args.seqlens, args.reps, args.json, ranks, args.masks, args.layouts),
             nprocs=max(ranks))


if __name__ == "__main__":
    sys.exit(main())
