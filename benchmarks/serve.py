"""serve-64req: continuous batching (memattn engine) vs transformers generate on padded batches and vs
transformers' own continuous batching.

64 requests, seeded prompt lengths 16-512 and output lengths 16-256, a random-initialised ~30M-parameter
Llama config (preset "llama-30m"), float32 on CPU, greedy, EOS ignored. Implementations:

- ``memattn.engine``: ``memattn.LLM`` (paged KV, chunked prefill, continuous batching), its default 16-token KV
  blocks (``--block-size``; transformers' continuous batching pages 256 tokens);
- ``hf.generate-bN``: transformers ``generate`` on left-padded batches of N (``--hf-batch``, several allowed),
  its default dynamic cache, each batch run to its longest output;
- ``hf.generate_batch``: transformers' continuous batching (the manager behind ``model.generate_batch``, with a
  per-request ``max_new_tokens``), KV pool and token budget sized as ours.

Each implementation runs in a fresh worker process (``--worker``): it loads the saved model, runs the first
``--check`` requests (output cut to 16 tokens) as warm-up and correctness check, then the whole workload
``--repeats`` times, timed (default once: the full workload takes minutes on 2 cores, so no median of 5; with
more, the run of median wall time is reported). The parent compares every
greedy output with the engine's, check run and timed run. Peak memory: the process's resident high-water mark
during the timed run (construction of the engine / manager included, so a KV pool counts as far as it is
touched), above the resident size before it (``memattn.memory.measure_process``, the process mode); the
profiler-based ``memattn.memory.measure`` would slow the many small ops of a serving loop too much to time them.

    python benchmarks/serve.py [--num-requests 64] [--max-output 256] [--hf-batch 16[,64]] [--impls ...]
                               [--cases serve-64req] [--repeats 1] [--threads N] [--json PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import machine, parser, print_records, record, wants, write_json  # noqa: E402

from memattn.engine.models import PRESETS  # noqa: E402
from _hf_baselines import run_hf_generate, run_hf_generate_batch  # noqa: E402
from memattn.engine.workload import make_requests, run_engine  # noqa: E402
from memattn.memory import measure_process  # noqa: E402

PRESET = "llama-30m"
OURS = "memattn.engine"
CHECK_TOKENS = 16


def _impls(args) -> list[str]:
    names = [OURS] + [f"hf.generate-b{b}" for b in args.hf_batch] + ["hf.generate_batch"]
    if args.impls:
        names = [n for n in names if n == OURS or n in args.impls]
    return names


def _runner(name: str, folder: str, args):
    """A fresh callable reqs -> result dict per call (the engine / manager is built inside, and counted)."""
    if name == OURS:
        from memattn.engine import LLM

        def run(reqs):
            llm = LLM(folder, kv_cache_memory=args.kv_mib << 20, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_batched_tokens, block_size=args.block_size)
            r = run_engine(llm, reqs)
            r["kv_reserved_mib"] = llm.cache.kv.numel() * llm.cache.kv.element_size() / 2**20
            r["preemptions"] = llm.stats()[1]
            return r
        return run
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    if name.startswith("hf.generate-b"):
        batch = int(name.rsplit("-b", 1)[1])
        return lambda reqs: run_hf_generate(hf, reqs, batch)
    if name == "hf.generate_batch":
        def run(reqs):
            r = run_hf_generate_batch(hf, reqs, max_batch_tokens=args.max_batched_tokens,
                                      kv_cache_memory=args.kv_mib << 20)
            r["kv_reserved_mib"] = args.kv_mib
            return r
        return run
    raise ValueError(f"unknown implementation {name!r}")


def worker(args) -> int:
    """One implementation in this process: check run, then the timed runs; results as JSON to args.out.
    (--threads is already applied: the harness's parser does it.)"""
    reqs = _requests(args)
    run = _runner(args.worker, args.folder, args)
    check = run([(p, min(m, CHECK_TOKENS)) for p, m in reqs[:args.check]])
    gc.collect()
    peak = measure_process(run, reqs)  # the first timed run: the process's peak is highest then
    runs = [peak.result] + [run(reqs) for _ in range(args.repeats - 1)]
    median = statistics.median_low(x["wall_s"] for x in runs)
    r = next(x for x in runs if x["wall_s"] == median)
    if any(x["tokens"] != runs[0]["tokens"] for x in runs):
        raise AssertionError(f"{args.worker}: greedy outputs changed between timed runs")
    # the machine is shared: the 1-minute load average at the end of the timed run says how much it was
    r.update(check_tokens=check["tokens"], peak_mib=peak.peak_mib, peak_method=peak.method,
             loadavg_1m=os.getloadavg()[0], threads=torch.get_num_threads(), reps=len(runs))
    with open(args.out, "w") as f:
        json.dump(r, f)
    return 0


def _requests(args):
    vocab = PRESETS[PRESET]["vocab_size"]
    return make_requests(args.num_requests, seed=args.seed, prompt_lens=(16, args.max_prompt),
                         output_lens=(16, args.max_output), vocab=vocab)


def _spawn(name: str, folder: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, name + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--folder", folder, "--out", out,
           "--num-requests", str(args.num_requests), "--max-prompt", str(args.max_prompt),
           "--max-output", str(args.max_output), "--seed", str(args.seed), "--check", str(args.check),
           "--kv-mib", str(args.kv_mib), "--max-num-seqs", str(args.max_num_seqs),
           "--max-batched-tokens", str(args.max_batched_tokens), "--repeats", str(args.repeats),
           "--block-size", str(args.block_size)] + (["--threads", str(args.threads)] if args.threads else [])
    subprocess.run(cmd, check=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    with open(out) as f:
        return json.load(f)


def _same(a: list, b: list) -> int:
    return sum(x == y for x, y in zip(a, b))


def _first_diff(a: list, b: list) -> str:
    """Where two token lists part: 'token i' or 'length'."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"token {i}"
    return "length"


def main(argv=None) -> int:
    p = parser(__doc__, repeats=1)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch", type=lambda s: [int(x) for x in s.split(",")], default=[16],
                   help="padded batch size(s) of hf.generate, comma-separated (default 16)")
    p.add_argument("--impls", type=lambda s: s.split(","), default=None,
                   help="baselines to run, comma-separated (default: all); the engine always runs")
    p.add_argument("--check", type=int, default=4, help="requests in each worker's check / warm-up run")
    p.add_argument("--kv-mib", type=int, default=256, help="KV pool of both continuous-batching engines")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="token budget per step (both engines)")
    p.add_argument("--block-size", type=int, default=16,
                   help="the engine's KV block (LLM's default, 16; the native decode kernel reads 16- and "
                        "128-token blocks at the same speed)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)  # applies --threads here and, passed on, in every worker
    if args.worker:
        return worker(args)
    case = f"serve-{args.num_requests}req"
    if not wants(case, args.cases):
        print(f"--cases selects nothing here (the case is {case})")
        return 0
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**PRESETS[PRESET])
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    n_params = sum(t.numel() for t in hf.parameters())
    reqs = _requests(args)
    n_prompt, n_out = sum(len(r[0]) for r in reqs), sum(r[1] for r in reqs)
    print(f"{case}: {PRESET} {n_params / 1e6:.1f}M params, {n_prompt} prompt tokens, {n_out} output tokens, "
          f"{torch.get_num_threads()} threads, transformers {transformers.__version__}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        hf.save_pretrained(folder)
        del hf
        for name in _impls(args):
            results[name] = _spawn(name, folder, args, tmp)
            print(f"  {name}: {results[name]['wall_s']:.1f} s (load average {results[name]['loadavg_1m']:.2f})",
                  flush=True)
    ours = results[OURS]
    common = dict(tokens_per_s=ours["out_tokens"] / ours["wall_s"], mean_ttft_s=ours["mean_ttft_s"],
                  peak_mib=ours["peak_mib"], kv_reserved_mib=ours.get("kv_reserved_mib"), out_tokens=ours["out_tokens"],
                  prompt_tokens=n_prompt, params_m=n_params / 1e6, max_batched_tokens=args.max_batched_tokens,
                  loadavg_1m=ours["loadavg_1m"], worker_threads=ours["threads"], block_size=args.block_size,
                  preemptions=ours.get("preemptions"), reps=ours["reps"],
                  peak_memory=f"process RSS high-water mark above the start of the timed run ({ours['peak_method']})")
    records, ok = [], True
    for name, r in results.items():
        if name == OURS:
            continue
        same, same_check = _same(ours["tokens"], r["tokens"]), _same(ours["check_tokens"], r["check_tokens"])
        ok &= same == len(reqs) and same_check == len(r["check_tokens"])
        rec = record(case, OURS, name, ours["wall_s"], r["wall_s"], **common,
                     baseline_tokens_per_s=r["out_tokens"] / r["wall_s"], baseline_mean_ttft_s=r["mean_ttft_s"],
                     baseline_peak_mib=r["peak_mib"], baseline_kv_reserved_mib=r.get("kv_reserved_mib"),
                     baseline_loadavg_1m=r["loadavg_1m"],
                     identical_outputs=f"{same}/{len(reqs)}",
                     identical_check_outputs=f"{same_check}/{len(r['check_tokens'])}")
        # every implementation makes exactly the requested tokens, so this is also the time ratio
        rec["speedup"] = rec["tokens_per_s"] / rec["baseline_tokens_per_s"]
        diffs = [f"request {i}: {_first_diff(a, b)}" for i, (a, b) in enumerate(zip(ours["tokens"], r["tokens"]))
                 if a != b]
        if diffs:
            rec["first_differences"] = diffs[:10]
        records.append(rec)
    if not records:  # the engine alone
        records.append(record(case, OURS, None, ours["wall_s"], None, **common))
    print_records(records, extra_cols=("tokens_per_s", "baseline_tokens_per_s", "mean_ttft_s", "baseline_mean_ttft_s",
                                       "identical_outputs"))
    for rec in records:
        for d in rec.get("first_differences", []):
            print(f"  {rec['baseline']} differs from the engine at {d}")
    write_json(args.json, records)
    print(f"machine: {machine()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
