"""http-32clients: OpenAI-compatible servers under concurrent streaming clients.

(Named http_clients.py, not http.py: a script called http.py beside the others would shadow the standard
library's ``http`` package for every benchmark script, since a script's folder comes first on sys.path.)

128 requests (``--num-requests``) from 32 concurrent streaming tasks (``--clients``) of the official ``openai``
client (``AsyncOpenAI``) on ``/v1/completions``. Prompt and output lengths are drawn as in ``serve-64req``
(prompts 16-512 tokens, outputs 16-256, seeded: ``memattn.engine.workload.make_requests``); prompts are real
text (``pydoc_data.topics``, Python's own documentation) cut to the drawn token count with the model's
tokenizer, so every server tokenises the same strings. Output lengths are fixed where the server allows it:
``ignore_eos`` (memattn, vLLM's extension), ``generation_config`` with ``min_new_tokens`` (transformers serve),
``min_tokens`` (llama-cpp-python). The output token count is the server's own ``usage.completion_tokens``.

Servers (``--servers``), each started as a fresh process on a free port, on the same weights and dtype:

- ``memattn.serve``: ``memattn serve --model FOLDER_OR_GGUF``;
- ``transformers.serve``: ``transformers serve FOLDER --continuous-batching`` (transformers' own
  OpenAI-compatible server with continuous batching);
- ``llama.cpp.server``: ``python -m llama_cpp.server`` (llama-cpp-python, built by ``make bench-real``) on the
  F32 GGUF of the same weights (``--gguf-f32``, default: made with llama.cpp's ``convert_hf_to_gguf.py``,
  ``benchmarks/_llamacpp.py``), ``--n_threads`` = the machine's cores, ``--interrupt_requests False`` (by
  default a new request cuts the running stream short; this way requests queue, served one at a time).

Recorded per server: output tokens/s (output tokens / wall time of the whole workload), TTFT p50/p99 (from
sending to the first chunk with text), inter-token latency p50/p99 (gaps between text chunks of a stream),
errors; for memattn also the KV blocks in use at the end (from ``/metrics``). Records: ``http-32clients``,
impl ``memattn.serve``, one per baseline, ``speedup`` = our output tokens/s / theirs.

    python benchmarks/http_clients.py [--model FOLDER] [--gguf-f32 FILE] [--servers memattn.serve,transformers.serve]
                              [--num-requests 128] [--clients 32] [--json PATH]
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import parser, print_table, record, write_json  # noqa: E402

OURS = "memattn.serve"
SERVERS = (OURS, "transformers.serve", "llama.cpp.server")
CASE = "http-32clients"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_prompts(tokenizer, lengths, seed: int = 0) -> list[str]:
    """One prompt of about n tokens per n in lengths, cut from Python's documentation at seeded offsets."""
    import random

    from pydoc_data.topics import topics

    ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)
    rng = random.Random(seed)
    out = []
    for n in lengths:
        start = rng.randrange(0, len(ids) - n)
        out.append(tokenizer.decode(ids[start:start + n], skip_special_tokens=False))
    return out


def workload(tokenizer, num: int, seed: int, max_prompt: int, max_output: int):
    """[(prompt text, output tokens)] with serve-64req's length distribution."""
    from memattn.engine.workload import make_requests

    reqs = make_requests(num, seed=seed, prompt_lens=(16, max_prompt), output_lens=(16, max_output))
    prompts = text_prompts(tokenizer, [len(p) for p, _ in reqs], seed)
    return [(text, m) for text, (_, m) in zip(prompts, reqs)]


END_TOKENS = ("<|endoftext|>", "<|im_end|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


def fixed_length_body(server: str, n: int, end_ids=()) -> dict:
    """The extra request fields that make `server` produce exactly n tokens (greedy).

    llama.cpp's ``min_tokens`` only holds back the one EOS token, while it ends a stream at any of its
    end-of-generation tokens; `end_ids` (the vocabulary's end tokens) get a -100 logit bias as well."""
    if server == OURS:
        return {"ignore_eos": True}
    if server == "transformers.serve":
        import json

        return {"generation_config": json.dumps({"max_new_tokens": n, "min_new_tokens": n, "do_sample": False})}
    return {"min_tokens": n, "logit_bias": {str(i): -100 for i in end_ids}}


def end_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.tok.token_to_id(t) for t in END_TOKENS] if hasattr(tokenizer, "tok") else []
    return sorted({i for i in ids + [tokenizer.eos_token_id] if i is not None})


class Server:
    """A server process on a free port; ``wait()`` until it answers ``/v1/models``, ``close()`` stops it."""

    def __init__(self, name: str, args, log_dir: str):
        self.name, self.port = name, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        threads = str(args.threads or os.cpu_count())
        if name == OURS:
            cmd = [sys.executable, "-m", "memattn.cli", "serve", "--model", args.model, "--port", str(self.port),
                   "--dtype", args.dtype, "--max-num-seqs", str(args.clients), "--kv-cache-memory",
                   args.kv_cache_memory]
            self.model_name = None
        elif name == "transformers.serve":
            exe = os.path.join(os.path.dirname(sys.executable), "transformers")
            cmd = [exe, "serve", os.path.abspath(args.model), "--continuous-batching", "--port", str(self.port),
                   "--host", "127.0.0.1", "--dtype", args.dtype, "--device", "cpu"]
            self.model_name = os.path.abspath(args.model)
        else:
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", args.gguf_f32, "--port", str(self.port),
                   "--host", "127.0.0.1", "--n_ctx", str(args.n_ctx), "--n_threads", threads,
                   "--n_threads_batch", threads, "--interrupt_requests", "False"]
            self.model_name = args.gguf_f32
        self.log = open(os.path.join(log_dir, name + ".log"), "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=threads)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 600) -> None:
        import json

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.base + "/v1/models", timeout=5) as r:
                    models = json.load(r)["data"]
                if self.model_name is None and models:
                    self.model_name = models[0]["id"]
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"{self.name} did not start in {timeout} s")

    def metrics(self) -> dict:
        """memattn's /metrics as {name: value} (gauges and counters without labels)."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)\s+([-+\d.eE]+|NaN)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _one(client, server: Server, prompt: str, n: int, stats: dict, end_ids) -> None:
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], None
    try:
        stream = await client.completions.create(
            model=server.model_name, prompt=prompt, max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=fixed_length_body(server.name, n, end_ids))
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
            if getattr(chunk, "usage", None):
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # the benchmark counts errors; it does not stop at the first
        stats["errors"].append(f"{type(e).__name__}: {str(e)[:200]}")
        return
    if first is None:
        stats["errors"].append("no text chunk")
        return
    stats["ttft"].append(first - t0)
    stats["itl"] += gaps
    # a server that sends no usage chunk: count text chunks (one token each on the servers here)
    stats["tokens"].append(tokens if tokens is not None else len(gaps) + 1)
    stats["short"] += (tokens if tokens is not None else len(gaps) + 1) < n


async def drive(server: Server, reqs, clients: int, end_ids=()) -> dict:
    """Run the requests from `clients` concurrent tasks; wall time and per-request figures."""
    from openai import AsyncOpenAI

    # the client's default pool allows far more connections than `clients`
    client = AsyncOpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=3600)
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    stats = dict(ttft=[], itl=[], tokens=[], errors=[], short=0)

    async def worker():
        while not queue.empty():
            prompt, n = queue.get_nowait()
            await _one(client, server, prompt, n, stats, end_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    stats["wall_s"] = time.perf_counter() - t0
    await client.close()
    return stats


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(stats: dict) -> dict:
    out = sum(stats["tokens"])
    return dict(out_tokens=out, tokens_per_s=out / stats["wall_s"], wall_s=stats["wall_s"],
                ttft_p50_s=_pct(stats["ttft"], 50), ttft_p99_s=_pct(stats["ttft"], 99),
                itl_p50_s=_pct(stats["itl"], 50), itl_p99_s=_pct(stats["itl"], 99),
                errors=len(stats["errors"]), short_outputs=stats["short"], error_samples=stats["errors"][:3])


def main(argv=None) -> int:
    p = parser(__doc__, repeats=1)
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct, memattn.testing)")
    p.add_argument("--gguf-f32", default=None, help="F32 GGUF of the same weights (for llama.cpp.server)")
    p.add_argument("--servers", type=lambda s: s.split(","), default=[OURS, "transformers.serve"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--kv-cache-memory", default="1536MiB",
                   help="memattn's KV pool (32 streams of up to 768 tokens need about 1.1 GB in float32)")
    p.add_argument("--n-ctx", type=int, default=8192, help="llama.cpp's context (shared by its slots)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown:
        p.error(f"unknown server(s) {unknown}; choose from {SERVERS}")
    if args.model is None:
        from memattn.testing import smollm2_folder

        args.model = smollm2_folder()
    if "llama.cpp.server" in args.servers and not args.gguf_f32:
        from _llamacpp import convert

        args.gguf_f32 = convert(args.model, "f32")
    from memattn.engine.models.loader import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    reqs = workload(tokenizer, args.num_requests, args.seed, args.max_prompt, args.max_output)
    end_ids = end_token_ids(tokenizer)
    print(f"{CASE}: {len(reqs)} requests, {args.clients} clients, {sum(n for _, n in reqs)} output tokens asked, "
          f"model {args.model}, {args.dtype}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for name in args.servers:
            server = Server(name, args, logs)
            try:
                t0 = time.perf_counter()
                server.wait()
                start_s = time.perf_counter() - t0
                asyncio.run(drive(server, reqs[:2], 2, end_ids))  # warm-up (not counted)
                stats = asyncio.run(drive(server, reqs, args.clients, end_ids))
                results[name] = dict(summary(stats), start_s=start_s, loadavg_1m=os.getloadavg()[0])
                if name == OURS:
                    time.sleep(0.5)
                    m = server.metrics()
                    results[name]["kv_blocks_used_end"] = m.get("memattn_kv_blocks_used")
                    results[name]["kv_blocks_free_end"] = m.get("memattn_kv_blocks_free")
            except Exception as e:
                with open(server.log.name) as f:
                    tail = f.read()[-2000:]
                print(f"  {name} failed: {e}\n{tail}", flush=True)
                results[name] = None
            finally:
                server.close()
            if args.json:  # each server's summary as soon as it is measured: a later one may not finish
                write_json(args.json + ".partial", [dict(server=k, **(v or {})) for k, v in results.items()])
            if results[name]:
                r = results[name]
                print(f"  {name}: {r['out_tokens']} tokens in {r['wall_s']:.1f} s = {r['tokens_per_s']:.1f} "
                      f"out tok/s, TTFT p50 {r['ttft_p50_s']:.2f} s, short {r['short_outputs']}, "
                      f"errors {r['errors']}", flush=True)
    ours = results.get(OURS)
    records = []
    for name, r in results.items():
        if name == OURS or r is None or ours is None:
            continue
        records.append(record(CASE, OURS, name, ours["wall_s"], r["wall_s"],
                              speedup=ours["tokens_per_s"] / r["tokens_per_s"] if r["tokens_per_s"] else None,
                              **{k: v for k, v in ours.items() if k != "wall_s"},
                              **{"baseline_" + k: v for k, v in r.items() if k != "wall_s"},
                              clients=args.clients, num_requests=len(reqs), dtype=args.dtype))
    if ours is not None and not records:
        records.append(record(CASE, OURS, None, ours["wall_s"], None, **ours, clients=args.clients,
                              num_requests=len(reqs), dtype=args.dtype))
    print_table(records, ["case", "impl", "baseline", "tokens_per_s", "baseline_tokens_per_s", "speedup",
                          "ttft_p50_s", "baseline_ttft_p50_s", "errors", "baseline_errors"])
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
