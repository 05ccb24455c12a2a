"""Paged KV cache: decode speed against SDPA on a contiguous cache, and memory waste under one KV budget.

    python benchmarks/paged.py [--cases NAME ...] [--repeats N] [--threads N ...] [--json PATH]

decode-*: 32 sequences of 4096 cached tokens, block 16, D=64, fp32, block ids a random permutation
(a fragmented pool). memattn.paged_attention reads the paged cache; the baseline is
torch.nn.functional.scaled_dot_product_attention on a contiguous (B, Hkv, S, D) cache holding the same
keys in (B, Hkv, S, D) (the layout SDPA and Hugging Face caches use); also timed, SDPA on the same keys
in memattn's own (B, S, Hkv, D) cache layout (baseline_bshd_time_s), and SDPA on a (B, Hkv, S, D) cache on huge
pages (baseline_hugepage_time_s). The paged pool is allocated as PagedKVCache allocates it (huge pages advised,
``memattn.cache.hugepages``); the main baseline's cache gets torch's default allocation, as HF caches do. All are checked against float64 first, then timed interleaved (A B A B ...) after a warm-up,
median of --repeats. kv_gbps = K+V bytes / time; copy_gbps = bytes / time of one large tensor copy
in the same run (the machine's copy bandwidth; each byte counted once). --threads 2 1 repeats the decode
cases with each torch thread count (on a shared, oversubscribed machine the 1-thread figures are the stable ones).

waste-1000req: 1,000 requests, prompt and output lengths drawn (seed 0) from log-normal distributions,
prompt = exp(N(ln 300, 1.0)), output = exp(N(ln 120, 1.0)), each at least 1, scaled down together
so that prompt + output <= 4096 (a long tail: total median 497, p99 3507, max 4095; recorded). All arrive at
once and are served FCFS under one KV budget of 65,536 token slots, one token per running sequence per step:
- paged (BlockManager, block 16): admitted while the prompt's blocks fit; a sequence that cannot get a
  block preempts the latest admitted (freed, re-queued, recomputed);
- contiguous: each admitted request reserves max length 4096 (65,536 / 4096 = 16 at a time).
KV utilization = tokens held / KV slots reserved, averaged over steps; partial-block waste = empty slots
of allocated blocks / allocated slots.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402

import memattn  # noqa: E402
from memattn.cache import BlockManager, hugepages  # noqa: E402
from memattn.memory import measure_call  # noqa: E402


def copy_gbps(nbytes=512 << 20, repeats=5):
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    t = _harness.interleaved_times({"copy": lambda: dst.copy_(src)}, repeats)["copy"]
    return nbytes / t / 1e9


def decode_case(name, batch, heads, kv_heads, ctx, repeats, block=16, d=64, dtype=torch.float32):
    torch.manual_seed(0)
    nb = ctx // block
    num_blocks = batch * nb
    # the pool as memattn's PagedKVCache allocates it (huge pages advised); the values of torch.randn
    shape = (num_blocks, block, kv_heads, d)
    kc = hugepages.zeros(shape, dtype=dtype).copy_(torch.randn(shape))
    vc = hugepages.zeros(shape, dtype=dtype).copy_(torch.randn(shape))
    table = torch.randperm(num_blocks).view(batch, nb).to(torch.int32)
    seqlens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, 1, heads, d).to(dtype)
    idx = table.long()
    k_bhsd = kc[idx].view(batch, ctx, kv_heads, d).transpose(1, 2).contiguous()
    v_bhsd = vc[idx].view(batch, ctx, kv_heads, d).transpose(1, 2).contiguous()
    q_bhsd = q.transpose(1, 2)
    gqa = heads != kv_heads

    def ours():
        return memattn.paged_attention(q, kc, vc, table, seqlens)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, enable_gqa=gqa).transpose(1, 2)

    def sdpa_bshd():  # the same keys in memattn's own (B, S, Hkv, D) layout, passed to SDPA as transposed views
        return torch.nn.functional.scaled_dot_product_attention(q_bhsd, k_bshd.transpose(1, 2), v_bshd.transpose(1, 2),
                                                                enable_gqa=gqa).transpose(1, 2)

    def sdpa_huge():  # the baseline's contiguous cache on huge pages too (sequential reads gain little from them)
        return torch.nn.functional.scaled_dot_product_attention(q_bhsd, k_huge, v_huge, enable_gqa=gqa).transpose(1, 2)

    k_bshd, v_bshd = k_bhsd.transpose(1, 2).contiguous(), v_bhsd.transpose(1, 2).contiguous()
    k_huge = hugepages.zeros(k_bhsd.shape, dtype=dtype).copy_(k_bhsd)
    v_huge = hugepages.zeros(v_bhsd.shape, dtype=dtype).copy_(v_bhsd)
    ref = torch.nn.functional.scaled_dot_product_attention(q_bhsd.double(), k_bhsd.double(), v_bhsd.double(),
                                                           enable_gqa=gqa).transpose(1, 2)
    err, base_err = (ours().double() - ref).abs().max().item(), (sdpa().double() - ref).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)
    times = _harness.interleaved_times({"ours": ours, "sdpa": sdpa, "bshd": sdpa_bshd, "huge": sdpa_huge}, repeats)
    t_ours, t_base, t_bshd, t_huge = times["ours"], times["sdpa"], times["bshd"], times["huge"]
    kv_bytes = 2 * batch * ctx * kv_heads * d * kc.element_size()
    return _harness.record(
        name, "memattn.paged_attention", "torch.sdpa (contiguous cache)", t_ours, t_base,
        peak_mib=measure_call(ours).peak_mib, baseline_peak_mib=measure_call(sdpa).peak_mib,
        max_err=err, baseline_max_err=base_err,
        kv_gbps=kv_bytes / t_ours / 1e9, baseline_kv_gbps=kv_bytes / t_base / 1e9,
        baseline_bshd_time_s=t_bshd, speedup_vs_bshd=t_bshd / t_ours,
        baseline_hugepage_time_s=t_huge, speedup_vs_hugepage=t_huge / t_ours, threads=torch.get_num_threads(),
        block_size=block, batch=batch, heads=heads, kv_heads=kv_heads, ctx=ctx, head_dim=d,
        block_table="random permutation", pool="memattn.cache.hugepages.zeros (huge pages advised)")


def request_lengths(n=1000, max_len=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.exp(math.log(300) + torch.randn(n, generator=g, dtype=torch.float64))
    output = torch.exp(math.log(120) + torch.randn(n, generator=g, dtype=torch.float64))
    scale = torch.clamp(max_len / (prompt + output), max=1.0)
    prompt = torch.clamp((prompt * scale).floor(), min=1).long()
    output = torch.clamp((output * scale).floor(), min=1).long()
    output = torch.minimum(output, max_len - prompt)
    return list(zip(prompt.tolist(), output.tolist()))


def simulate_paged(reqs, budget_tokens, block=16):
    bm = BlockManager(budget_tokens // block, block, enable_prefix_caching=False)
    waiting = list(range(len(reqs)))  # FCFS queue
    running, generated = [], {}
    util, waste, peak, steps, preempted = [], [], 0, 0, 0
    rid = 0
    while waiting or running:
        while waiting and bm.can_allocate(range(reqs[waiting[0]][0])):
            r = waiting.pop(0)
            # distinct token ids per request (no prefix sharing in this workload)
            bm.allocate(r, range(rid, rid + reqs[r][0]))
            rid += reqs[r][0]
            running.append(r)
            generated[r] = 0
        peak = max(peak, len(running))
        steps += 1
        for r in list(running):
            if r not in running:
                continue  # preempted this step
            while not bm.can_append(r, 1):
                victim = running.pop()  # latest admitted
                bm.free(victim)
                waiting.insert(0, victim)
                preempted += 1
                if victim == r:
                    break
            if r not in running:
                continue
            bm.append_slots(r, [0])
            generated[r] += 1
            if generated[r] >= reqs[r][1]:
                running.remove(r)
                bm.free(r)
        s = bm.stats()
        if s.used_blocks:
            util.append(s.tokens / (s.used_blocks * block))
            waste.append(s.wasted_tokens / (s.used_blocks * block))
    return dict(kv_utilization_pct=100 * statistics.mean(util), partial_block_waste_pct=100 * statistics.mean(waste),
                peak_concurrent_seqs=peak, steps=steps, preemptions=preempted)


def simulate_contiguous(reqs, budget_tokens, max_len=4096):
    slots = budget_tokens // max_len
    waiting, running, util, peak, steps = list(range(len(reqs))), {}, [], 0, 0
    while waiting or running:
        while waiting and len(running) < slots:
            running[waiting.pop(0)] = 0
        peak = max(peak, len(running))
        steps += 1
        for r in list(running):
            running[r] += 1
            if running[r] >= reqs[r][1]:
                del running[r]
        if running:
            util.append(sum(reqs[r][0] + g for r, g in running.items()) / (len(running) * max_len))
    return dict(kv_utilization_pct=100 * statistics.mean(util), partial_block_waste_pct=None,
                peak_concurrent_seqs=peak, steps=steps, preemptions=0)


def waste_case(budget_tokens=65536):
    reqs = request_lengths()
    t0 = time.perf_counter()
    paged = simulate_paged(reqs, budget_tokens)
    t1 = time.perf_counter()
    contiguous = simulate_contiguous(reqs, budget_tokens)
    t2 = time.perf_counter()
    totals = sorted(p + o for p, o in reqs)
    return _harness.record(
        "waste-1000req", "memattn.cache.BlockManager (block 16)",
        "contiguous max-length (4096) pre-allocation", t1 - t0, t2 - t1,
        speedup=contiguous["steps"] / paged["steps"], peak_mib=None, baseline_peak_mib=None,
        max_err=0.0, kv_budget_tokens=budget_tokens,
        length_median=totals[len(totals) // 2], length_p99=totals[int(0.99 * len(totals))],
        length_max=totals[-1], paged=paged, contiguous=contiguous,
        concurrency_ratio=paged["peak_concurrent_seqs"] / contiguous["peak_concurrent_seqs"],
        note="time_s: simulation wall time; speedup = contiguous steps / paged steps to serve all requests")


CASES = {
    "decode-32seq-ctx4096-fp32": lambda r: decode_case("decode-32seq-ctx4096-fp32", 32, 8, 8, 4096, r),
    "decode-gqa-32seq-ctx4096-fp32": lambda r: decode_case("decode-gqa-32seq-ctx4096-fp32", 32, 32, 8, 4096, r),
    "decode-32seq-ctx4096-bf16": lambda r: decode_case("decode-32seq-ctx4096-bf16", 32, 8, 8, 4096, r,
                                                       dtype=torch.bfloat16),
    "decode-gqa-32seq-ctx4096-bf16": lambda r: decode_case("decode-gqa-32seq-ctx4096-bf16", 32, 32, 8, 4096, r,
                                                           dtype=torch.bfloat16),
    "waste-1000req": lambda r: waste_case(),
}


def main(argv=None):
    ap = _harness.parser(__doc__, repeats=7, threads=[torch.get_num_threads()], thread_sweep=True)
    args = ap.parse_args(argv)
    records, default = [], torch.get_num_threads()
    for name in _harness.selected(CASES, args.cases):
        for threads in (args.threads if name.startswith("decode") else [default]):
            torch.set_num_threads(threads or default)
            rec = CASES[name](args.repeats)
            if name.startswith("decode"):
                rec["copy_gbps"] = copy_gbps(repeats=args.repeats)
                rec["kv_gbps_over_copy"] = rec["kv_gbps"] / rec["copy_gbps"]
            records.append(rec)
    print(f"{'case':32} {'thr':>3} {'ours':>10} {'sdpa bhsd':>10} {'speedup':>8} {'sdpa bshd':>10} {'speedup':>8} "
          f"{'sdpa huge':>10} {'speedup':>8} {'GB/s':>6} {'base':>6} {'copy':>6}")
    for r in records:
        if "kv_gbps" in r:
            print(f"{r['case']:32} {r['threads']:3d} {r['time_s'] * 1e3:8.1f}ms {r['baseline_time_s'] * 1e3:8.1f}ms "
                  f"{r['speedup']:8.2f} {r['baseline_bshd_time_s'] * 1e3:8.1f}ms {r['speedup_vs_bshd']:8.2f} "
                  f"{r['baseline_hugepage_time_s'] * 1e3:8.1f}ms {r['speedup_vs_hugepage']:8.2f} "
                  f"{r['kv_gbps']:6.1f} {r['baseline_kv_gbps']:6.1f} {r['copy_gbps']:6.1f}")
        else:
            p, c = r["paged"], r["contiguous"]
            print(f"{r['case']:32} paged: util {p['kv_utilization_pct']:.1f}%  partial-block waste "
                  f"{p['partial_block_waste_pct']:.2f}%  peak {p['peak_concurrent_seqs']} seqs  "
                  f"({p['steps']} steps, {p['preemptions']} preemptions)")
            print(f"{'':32} contiguous: util {c['kv_utilization_pct']:.1f}%  peak {c['peak_concurrent_seqs']} seqs "
                  f"({c['steps']} steps)  -> {r['concurrency_ratio']:.1f}x concurrency")
    _harness.write_json(args.json, records)


if __name__ == "__main__":
    main()
