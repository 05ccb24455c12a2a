"""``memattn compare-kv``: the memory table for inference, measured on this machine.

For a model's KV geometry (a preset's, or a checkpoint's with ``--model PATH``) and each context length N, one
row per way of keeping the context of ``batch`` sequences:

- ``contiguous``: ``memattn.cache.KVCache`` per layer, full width, decode by SDPA over it;
- ``paged (auto)``, ``int8``, ``fp8_e4m3``, ``int4``, ``int2``: a ``PagedKVCache`` in that ``kv_dtype``, decode by
  ``memattn.paged_attention`` (the native kernel reads every format in place);
- ``sinks S + window W``: StreamingLLM's bounded pool: the blocks a sequence keeps between steps
  (``engine.streaming.StreamingPolicy``: its sink blocks and its window blocks), full width;
- ``linear state``: ``memattn.LinearAttentionState`` per layer, (batch, heads, D, D + 1) whatever N (a different
  model: elu+1 linear attention with the query heads).

Columns: bytes per token (all layers, keys and values, scales included; for the bounded rows, their bytes at
N divided by N), the measured peak while allocating and filling the cache for N tokens (``measure_call``, not
an estimate), decode time per token (one decode step of attention through every layer), and, with real weights,
the perplexity change against the full-width cache on Python's documentation (``engine.evaluate``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .cache import KVCache, PagedKVCache, kv_formats
from .memory import measure_call

BLOCK = 16
DEFAULT_PRESET = "smollm2-135m"


@dataclass(frozen=True)
class Geometry:
    """The KV shapes of a model: layers, query heads, kv heads, head_dim, and the cache's element type."""

    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, cfg) -> "Geometry":
        """From an engine ``ModelConfig``."""
        d = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        return cls(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, d)


@dataclass
class KVRecord:
    row: str
    context: int
    batch: int
    bytes_per_token: float
    peak_mib: float
    decode_s: float
    ppl: float | None
    ppl_change: float | None  # ppl / ppl(full width) - 1; None: no real weights, or a different model
    note: str = ""


def row_names(sinks: int, window: int) -> list[str]:
    return ["contiguous", "paged (auto)", *kv_formats.QUANTIZED, f"sinks {sinks} + window {window}", "linear state"]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def pool_tensor_bytes(cache: PagedKVCache) -> int:
    """Bytes of a pool's codes and scales (what ``kv_formats.bytes_per_token`` counts; not KIVI's residual)."""
    return _tensor_bytes((cache.kv, *cache.meta))


# ---------------------------------------------------------------- one row at one context

def _paged(fmt: str, g: Geometry, batch: int, blocks_per_seq: int, tokens_per_seq: int, k, v):
    """A pool of batch x blocks_per_seq blocks, each sequence's first tokens_per_seq slots written on every
    layer (k, v: (tokens_per_seq, Hkv, D)); sequence b owns blocks b * blocks_per_seq onwards."""
    cache = PagedKVCache(g.num_layers, batch * blocks_per_seq, BLOCK, g.kv_heads, g.head_dim, dtype=g.dtype,
                         kv_dtype=fmt, residual_blocks=batch)  # KIVI: one residual block per sequence
    for layer in range(g.num_layers):
        for b in range(batch):
            cache.write(b * blocks_per_seq * BLOCK + torch.arange(tokens_per_seq), k, v, layer=layer)
    return cache


def _paged_row(fmt, g, batch, n, kept_tokens, repeats, k, v):
    """(bytes per token, peak bytes, decode seconds) of a paged pool holding kept_tokens of each sequence."""
    blocks = -(-kept_tokens // BLOCK)
    m = measure_call(_paged, fmt, g, batch, blocks, kept_tokens, k[:kept_tokens], v[:kept_tokens])
    cache = m.result
    per = pool_tensor_bytes(cache) / (batch * n)
    table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    seqlens = torch.full((batch,), kept_tokens, dtype=torch.int32)
    q = torch.randn(batch, 1, g.heads, g.head_dim, dtype=g.dtype)
    from .ops.paged import paged_attention

    def step():
        for layer in range(g.num_layers):
            paged_attention(q, cache.key_cache(layer), cache.value_cache(layer), table, seqlens)
    return per, m.peak_bytes, _median_time(step, repeats)


def _contiguous(g: Geometry, batch: int, n: int, k, v):
    caches = []
    for _ in range(g.num_layers):
        c = KVCache(batch, g.kv_heads, g.head_dim, max_seqlen=n, dtype=g.dtype)
        c.update(k, v)
        caches.append(c)
    return caches


def _contiguous_row(g, batch, n, repeats, k, v):
    kb, vb = k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1)
    m = measure_call(_contiguous, g, batch, n, kb, vb)
    caches = m.result
    per = _tensor_bytes(t for c in caches for t in (c._k, c._v)) / (batch * n)
    q = torch.randn(batch, g.heads, 1, g.head_dim, dtype=g.dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def step():
        for c in caches:  # (B, N, Hkv, D) views -> SDPA's (B, Hkv, N, D), grouped query heads
            sdpa(q, c.keys.transpose(1, 2), c.values.transpose(1, 2), enable_gqa=True)
    return per, m.peak_bytes, _median_time(step, repeats)


def _linear(g: Geometry, batch: int):
    from .ops.linear import LinearAttentionState

    states = [LinearAttentionState.zeros(batch, g.heads, g.head_dim, g.head_dim, dtype=g.dtype)
              for _ in range(g.num_layers)]
    x = torch.randn(batch, g.heads, g.head_dim, dtype=g.dtype)
    for s in states:  # the state absorbs a token; its size is the same after any number of them
        s.step(x, x, x)
    return states


def _linear_row(g, batch, n, repeats):
    m = measure_call(_linear, g, batch)
    states = m.result
    per = _tensor_bytes(s._s for s in states) / (batch * n)
    q, k, v = (torch.randn(batch, g.heads, g.head_dim, dtype=g.dtype) for _ in range(3))

    def step():
        for s in states:
            s.step(q, k, v)
    return per, m.peak_bytes, _median_time(step, repeats)


# ---------------------------------------------------------------- quality

def quality(model, tokenizer, eval_tokens: int, sinks: int, window: int, chunk: int = 64) -> dict:
    """{row name: perplexity} on the first eval_tokens tokens of ``pydoc_text``, fed in chunks of `chunk`
    through the engine with each row's cache (contiguous: the same full-width values as paged auto)."""
    from .engine.evaluate import perplexity, pydoc_text, window_nll

    tokens = tokenizer.encode(pydoc_text())[:eval_tokens]
    out = {}
    for fmt in ("auto", *kv_formats.QUANTIZED):
        out[fmt] = perplexity(window_nll(model, tokenizer, tokens, chunk=chunk, block_size=BLOCK,
                                         kv_cache_dtype=fmt), len(tokens) - 1)
    out["window"] = perplexity(window_nll(model, tokenizer, tokens, chunk=chunk, block_size=BLOCK,
                                          attention_sinks=sinks, streaming_window=window), len(tokens) - 1)
    return out


# ---------------------------------------------------------------- the table

def run_compare_kv(contexts, geometry: Geometry, *, batch: int = 1, sinks: int = 4, window: int = 1020,
                   repeats: int = 5, ppl: dict | None = None, seed: int = 0, progress=None) -> list[KVRecord]:
    """One KVRecord per (row, context). `ppl`: ``quality``'s result (None: quality "-")."""
    from .engine.streaming import StreamingPolicy

    for name, value, low in (("batch", batch, 1), ("sinks", sinks, 0), ("window", window, 1),
                             ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not contexts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in contexts):
        raise ValueError(f"contexts must be positive ints, got {contexts!r}")
    for fmt in kv_formats.QUANTIZED:
        kv_formats.kv_format(fmt).check_head_dim(geometry.head_dim)
    policy = StreamingPolicy(sinks, window, BLOCK)
    kept_window = (policy.pinned_blocks + policy.window_blocks) * BLOCK
    names = row_names(sinks, window)
    base = ppl.get("auto") if ppl else None
    records = []
    g = torch.Generator().manual_seed(seed)
    for n in contexts:
        k = torch.randn(n, geometry.kv_heads, geometry.head_dim, generator=g).to(geometry.dtype)
        v = torch.randn(n, geometry.kv_heads, geometry.head_dim, generator=g).to(geometry.dtype)
        for name in names:
            note, key = "", None
            if name == "contiguous":
                per, peak, secs = _contiguous_row(geometry, batch, n, repeats, k, v)
                key, note = "auto", "SDPA"
            elif name == "linear state":
                per, peak, secs = _linear_row(geometry, batch, n, repeats)
                note = "fixed size"
            elif name.startswith("sinks"):
                kept = min(n, kept_window)
                per, peak, secs = _paged_row("auto", geometry, batch, n, kept, repeats, k, v)
                key, note = "window", f"{-(-kept // BLOCK)} blocks"
            else:
                fmt = "auto" if name == "paged (auto)" else name
                per, peak, secs = _paged_row(fmt, geometry, batch, n, n, repeats, k, v)
                key = fmt
            p = ppl.get(key) if ppl and key else None
            change = None if p is None else p / base - 1.0
            rec = KVRecord(name, n, batch, per, peak / 2**20, secs, p, change, note)
            records.append(rec)
            if progress:
                progress(rec)
    return records


def records_as_dicts(records):
    return [asdict(r) for r in records]


def _bytes(per: float) -> str:
    return f"{per / 1024:.1f} KiB" if per >= 1024 else f"{per:.1f} B"


def table_rows(records):
    from .compare import format_bytes_mib

    rows = []
    for r in records:
        if r.ppl_change is None:
            q = "-"
        elif r.row in ("contiguous", "paged (auto)"):
            q = f"baseline ({r.ppl:.3f})"
        else:
            q = f"{100 * r.ppl_change:+.3f}%"
        rows.append([r.row, str(r.context), _bytes(r.bytes_per_token), format_bytes_mib(r.peak_mib),
                     f"{r.decode_s * 1e3:.2f} ms", q, r.note])
    return rows


TABLE_HEADER = ["cache", "context", "bytes/token", "peak KV (measured)", "decode/token", "ppl change", "note"]


def plot(records, path, title: str):
    """Measured peak and decode time against context length, log axes, one line per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r.row for r in records):
        rs = [r for r in records if r.row == name]
        xs = [r.context for r in rs]
        ax_m.plot(xs, [r.peak_mib for r in rs], marker="o", label=name)
        ax_t.plot(xs, [r.decode_s * 1e3 for r in rs], marker="o", label=name)
    for ax, ylabel in ((ax_m, "peak KV memory (MiB, measured)"), (ax_t, "decode time per token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Geometry", "KVRecord", "run_compare_kv", "quality", "row_names", "table_rows", "TABLE_HEADER", "plot",
           "pool_tensor_bytes", "records_as_dicts", "DEFAULT_PRESET"]
