"""Ring attention on P = 1, 2, 4 gloo ranks vs single-process memattn attention on the full sequence.

    python benchmarks/ring.py [--cases NAME ...] [--repeats 2] [--threads 2] [--json PATH]
                              [--seqlens 16384 65536] [--ranks 1 2 4] [--masks causal full]
                              [--layouts zigzag contiguous]

Cases ``ring-{causal-|}fwdbwd-S{S}-P{P}-fp32`` (zigzag layout; at S <= 16384 the contiguous
layout is run for causal cases too, to show its imbalance; above it only P = 2, 4, one run). The flags
pick a subset (for development: ``--seqlens 16384 --ranks 2 --masks causal --layouts zigzag --repeats 1``;
``--cases`` then selects by name; ``--reps`` is the old name of ``--repeats``).
One spawn of max(--ranks) ranks on 127.0.0.1 serves every case: smaller P run on sub-groups of
ranks 0..P-1 while the other ranks wait at a barrier, and the baseline runs on
rank 0 with --threads threads (default 2: the machine has 2 cores) between ring runs (interleaved
A B A B). Ring ranks share them: max(1, threads // P) each.

Per rank we measure: fwd+bwd wall time, compute time (wall time minus time blocked in ring
waits, counted by ``memattn.distributed.comm.WaitClock``), and peak memory (``memattn.memory.measure_call``:
the profiler's allocator events, relative to the start of the call). ``time_s`` is the slowest rank's time,
``peak_mib`` the largest per-rank peak, ``imbalance`` = max / min per-rank compute time - 1.
Correctness first: every rank checks its shard of out/dq/dk/dv against the baseline.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

import memattn  # noqa: E402
import memattn.distributed as md  # noqa: E402
from memattn.distributed.comm import WaitClock  # noqa: E402
from memattn.memory import measure_call  # noqa: E402

B, H, D = 1, 2, 32
# One fwd+bwd at S = 65536 takes minutes on 2 shared cores: above SHORT only P = 2, 4 (zigzag) run, once.
SHORT, LONG_RANKS = 16384, (2, 4)


def _flops(s, causal):
    f = 4 * B * H * s * s * D * 3.5  # forward + backward (x2.5)
    return f / 2 if causal else f


def _fwdbwd(fn, q, k, v, dout, profile):
    """out, grads and (when profile) the peak MiB of one forward + backward."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def run():
        out = fn(q, k, v)
        out.backward(dout)
        return out.detach()
    if profile:
        m = measure_call(run)
        return m.result, (q.grad, k.grad, v.grad), m.peak_mib
    return run(), (q.grad, k.grad, v.grad), None


def _inputs(s, causal_seed):
    gen = torch.Generator().manual_seed(causal_seed)
    return [torch.randn(B, s, h, D, generator=gen) for h in (H, H, H, H)]


def _case_name(s, causal, p, layout):
    return f"ring-{'causal-' if causal else ''}fwdbwd-S{s}-P{p}-fp32" + ("" if layout == "zigzag" else "-contiguous")


def _configs(s, causal, args, ranks):
    """The (P, layout) pairs run for one (S, causal), in order, as the flags select them."""
    long = s > SHORT
    configs = [(p, "zigzag") for p in ranks if p in LONG_RANKS or not long] if "zigzag" in args.layouts else []
    if causal and not long and "contiguous" in args.layouts:
        configs += [(p, "contiguous") for p in ranks if p > 1]
    return [c for c in configs if _harness.wants(_case_name(s, causal, *c), args.cases)]


def _run_case(rank, s, causal, reps, groups, configs, threads):
    """Rows for one (S, causal): baseline and ring at each (P, layout) of `configs`, interleaved; rank 0 returns
    records. The baseline gets `threads` intra-op threads, each of P ring ranks max(1, threads // P)."""
    q, k, v, dout = _inputs(s, 1234 + s)
    shards, results = {}, {}
    base = {"time": [], "peak": None, "out": None}
    for p, layout in configs:
        if rank < p:
            g = groups[p]
            shards[p, layout] = [md.shard(t, g, layout) for t in (q, k, v, dout)]
        results[p, layout] = {"time": [], "compute": [], "peak": None, "err": None}
    for rep in range(reps):
        profile = rep == 0  # warm-up, memory and correctness; timed too only when it is the one run
        timed = reps == 1 or rep > 0
        dist.barrier()
        if rank == 0:  # baseline: the whole sequence in one process, all the threads
            torch.set_num_threads(threads)
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
                torch.set_num_threads(max(1, threads // p))
                g = groups[p]
                ql, kl, vl, dl = shards[p, layout]
                dist.barrier(g)
                t = time.perf_counter()
                with WaitClock() as clock:
                    out, grads, peak = _fwdbwd(lambda a, b_, c: md.ring_attention(a, b_, c, group=g, causal=causal,
                                                                                  layout=layout),
                                               ql, kl, vl, dl, profile)
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
        records.append(_harness.record(
            _case_name(s, causal, p, layout), f"memattn.distributed.ring_attention({layout})",
            f"memattn.attention (1 process, {threads} threads)", t, bt,
            peak_mib=max(res["peak"]), baseline_peak_mib=base["peak"],
            peak_ratio=max(res["peak"]) / base["peak"], max_err=res["err"],
            gflops=_flops(s, causal) / t / 1e9, baseline_gflops=_flops(s, causal) / bt / 1e9,
            ranks=p, layout=layout, threads=threads, threads_per_rank=max(1, threads // p),
            per_rank_peak_mib=res["peak"], per_rank_compute_s=per_rank,
            imbalance=max(per_rank) / min(per_rank) - 1, reps=len(res["time"]),
            B=B, H=H, D=D, S=s, causal=causal))
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


def _worker(rank, port, args, ranks):
    md.init_process_group("gloo", timeout_s=1800, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=max(ranks))
    groups = {p: dist.new_group(list(range(p))) for p in ranks}  # every rank makes every group, in order
    threads = args.threads or 2  # the project's machine has 2 cores
    records = []
    for s in args.seqlens:
        for causal in [m == "causal" for m in args.masks]:
            configs = _configs(s, causal, args, ranks)  # the same on every rank: all skip a case, or none
            if not configs:
                continue
            new = _run_case(rank, s, causal, args.repeats + 1 if s <= SHORT else 1, groups, configs, threads)
            records += new
            if rank == 0:
                _print(new)
                _harness.write_json(args.json, records)  # after every case, so a long run keeps what it measured
    dist.destroy_process_group()


def _print(records):
    for r in records:
        print(f"{r['case']:<44} ring {r['time_s']:7.2f}s  base {r['baseline_time_s']:7.2f}s  "
              f"speedup {r['speedup']:.2f}  peak/rank {r['peak_mib']:7.1f} MiB  base {r['baseline_peak_mib']:7.1f} MiB "
              f"({r['peak_ratio']:.2f}x)  imbalance {100 * r['imbalance']:5.1f}%  err {r['max_err']:.1e}", flush=True)


def main(argv=None):
    ap = _harness.parser(__doc__, repeats=2, threads=2)
    ap.add_argument("--reps", dest="repeats", type=int, default=argparse.SUPPRESS,
                    help="old name of --repeats: timed runs per case at S <= 16384, after a profiled one "
                         "(above: the profiled run only)")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 4])
    ap.add_argument("--masks", nargs="+", default=["causal", "full"], choices=["causal", "full"])
    ap.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"], choices=list(md.LAYOUTS),
                    help="contiguous runs only for causal cases at S <= 16384")
    args = ap.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = sorted(set(args.ranks))
    mp.spawn(_worker, args=(port, args, ranks), nprocs=max(ranks))


if __name__ == "__main__":
    sys.exit(main())
