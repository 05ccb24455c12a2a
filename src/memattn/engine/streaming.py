"""StreamingLLM in the engine (Xiao et al., 2023): attention sinks plus a recent window, with a bounded cache.

The policy (``LLM(..., attention_sinks=S, streaming_window=W)``), exact to the token: the query at position t
(0-based, in the original text) attends to the first S tokens (the sinks) and to the last W tokens, itself
included::

    visible(t) = [0, S)  U  [t - W + 1, t]

with positions assigned within the cache, as the paper prescribes: the cache a query sees is its visible
tokens in order, and token number c of that list sits at position c. So a sink i is at position i, and the
query at c(t) = min(t, S + W - 1); the window's keys keep their distances t - j to the query.

**Memory, at block granularity.** The pool holds whole blocks. Between steps a sequence keeps exactly
its first ceil(S / bs) blocks (they hold the sinks; their slots after the S-th are never read once the
window has left them) and its last ceil((W - 1) / bs) + 1 blocks, which always include every block its next
query's window overlaps; older blocks are freed as soon as the computed count passes them
(``BlockManager.evict``), during prefill and generation alike. During a step it also holds the blocks of that
step's new tokens (the scheduler caps a streaming sequence's chunk so that they fit the pool). So however
long it runs, a sequence holds the same number of blocks from one step to the next once its window has
filled: used blocks stay flat. With block_size 16, 4 sinks and W = 1020 that is
1 + 65 = 66 blocks (1056 slots) for the 1024 tokens attended. Attention is exact to the token: slots of
kept blocks outside visible(t) are masked, never attended.

**Rotary positions: neither re-rotation nor rotation at read time, but the sinks' share computed apart.**
RoPE scores depend only on the distance between query and key. The window's keys have the same distance to
the query in the cache as in the text (t - j), so they are cached once, rotated at their text positions, and
never touched again; the query is rotated at its text position t for them. Only the sinks' distances differ
(c(t) - i instead of t - i), so the query is rotated a second time, at its cache position c(t), for the sink
keys (cached at their own positions i < S, which are their cache positions too). Each step therefore runs:

- the window part: ``paged_attention`` with ``window_size=(W - 1, 0)`` over the blocks after the sinks'
  (over all blocks until the first eviction), read in place by the usual kernels (the native C decode
  kernel included), with its lse;
- the sink part: the at most S sinks not already in the window, ``[0, min(S, t - W + 1))``, a small dense
  computation (``sink_attention``);
- the two merged by their log-sum-exp (``merge_attention``): they saw disjoint keys.

This is "rotate the cached keys back by the evicted count" with the rotation moved to the query's side: in
exact arithmetic rotating every window key and the query back by e (the evicted count) equals rotating the
sink part's query to c(t) = t - e. Why this way:

- the native kernel and the other decode kernels run unchanged (one visible range); unrotated keys with
  rotary at read time would need every kernel to rotate every key it reads, every step;
- the cache is write-once: rotating the window back every time it moves would rewrite ~W keys per layer per
  evicted block, and for quantized caches dequantize and requantize them each time, compounding the error
  (int8/fp8 scales, and KIVI's per-channel key statistics, which a rotation mixes pairwise); here each key
  is quantized once, with the statistics of its own block, as in a dense cache;
- prefix caching: cached KV never changes after it is written, and it is a function of the tokens before it
  and the engine-wide policy (S, W), so sharing it would be sound; the engine still turns prefix caching off
  for streaming sequences, because their early blocks are freed as they go (a prefix that outlives its
  window cannot be revived as a whole) and their admission allocates chunk by chunk. Preemption is by
  recompute only (re-prefilling under the same exact policy gives the same KV); swap is refused.

The price: text positions grow without bound (the query is rotated at t, the window's keys at j), and
RoPE's angles are computed in float32 for float32 models (float64 for float64 ones). At t the angle's
rounding is about t * 6e-8 rad: 1e-3 at 20,000 tokens, the same order a dense model sees at its own training
length, but 0.06 rad at a million tokens; a longer stream would want the angles in float64
(``rope_cos_sin``), which re-rotating the window back (bounded positions) would not need.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.merge import merge_attention


@dataclass(frozen=True)
class StreamingPolicy:
    """sinks S >= 0 and window W >= 1 (tokens), over blocks of block_size tokens."""

    sinks: int
    window: int
    block_size: int

    def __post_init__(self):
        for name, value, low in (("attention_sinks", self.sinks, 0), ("streaming_window", self.window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    @property
    def pinned_blocks(self) -> int:
        """Leading blocks a sequence keeps for its sinks."""
        return -(-self.sinks // self.block_size)

    @property
    def window_blocks(self) -> int:
        """Blocks a sequence keeps for its window between steps, ceil((W - 1) / bs) + 1: the blocks the next
        query's window [t - W + 1, t - 1] overlaps number at most this, whatever t's alignment, so keeping this
        many (the last ones) keeps every one it reads, and the count stays the same from step to step."""
        return -(-(self.window - 1) // self.block_size) + 1

    def keep_from(self, num_computed: int) -> int:
        """The first token of the blocks a sequence with `num_computed` computed tokens keeps (besides its
        pinned blocks): those of its last ``window_blocks`` blocks. Every later query t >= num_computed
        reads only tokens >= t - W + 1 >= this."""
        blocks = -(-num_computed // self.block_size)
        return max(0, blocks - self.window_blocks) * self.block_size

    def cache_position(self, t: torch.Tensor) -> torch.Tensor:
        """The position c(t) = min(t, S + W - 1) of queries at text positions t within their cache."""
        return t.clamp(max=self.sinks + self.window - 1)

    def sink_cutoff(self, t: torch.Tensor) -> torch.Tensor:
        """How many sinks the sink part of the query at t reads: those before its window, min(S, t - W + 1)."""
        return (t - self.window + 1).clamp(min=0, max=self.sinks)


@dataclass
class StreamingStep:
    """A step's streaming metadata, built once for every layer (``ModelRunner.prepare``).

    sink_positions: int64 (T,) each packed query's cache position c(t) (the sink part's rotary).
    sink_slots: int64 (B, S) the cache slots of each sequence's sinks. sink_rows: int64 (T,) each query's
    sequence. sink_cutoff: int64 (T,) sinks its sink part reads (0: none). window: W.
    """

    sink_positions: torch.Tensor
    sink_slots: torch.Tensor
    sink_rows: torch.Tensor
    sink_cutoff: torch.Tensor
    window: int
    rope: tuple | None = None  # (cos, sin) at sink_positions, set by the model once per step


def _read_slots(cache, slots: torch.Tensor) -> torch.Tensor:
    """Cache slots (n,) (block * block_size + offset) as (n, Hkv, D). Read through ``index_select`` on the blocks
    they fall in, so a quantized pool (``QuantizedPages``) is dequantized for those blocks only."""
    bs = cache.shape[1]
    slots = slots.to(torch.int64)
    blocks, where = torch.unique(slots // bs, return_inverse=True)
    return cache.index_select(0, blocks)[where, slots % bs]


def sink_attention(q, key_cache, value_cache, step: StreamingStep, scale: float):
    """The sink part: q (T, H, D), rotated at its cache positions, against its sequence's first sink_cutoff
    sinks, read from the cache slots ``step.sink_slots``. Returns out (T, H, D), lse (H, T) in the compute
    dtype (float32, float64 for float64); rows reading no sink get out 0, lse -inf.

    Small by construction (S keys per query), so dense: GQA query heads grouped per kv head."""
    t, h, d = q.shape
    hkv = key_cache.shape[2]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = _read_slots(key_cache, step.sink_slots).to(cd)[step.sink_rows]  # (T, S, Hkv, D)
    v = _read_slots(value_cache, step.sink_slots).to(cd)[step.sink_rows]
    qg = q.to(cd).view(t, hkv, h // hkv, d)
    s = torch.einsum("tkgd,tskd->tkgs", qg, k) * scale
    visible = torch.arange(k.shape[1], device=q.device) < step.sink_cutoff.unsqueeze(1)  # (T, S)
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # -inf where no sink is visible
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.einsum("tkgs,tskd->tkgd", p, v).reshape(t, h, d)
    return out, lse.reshape(t, h).transpose(0, 1)


def merge_sink_part(out, lse, q_sinks, key_cache, value_cache, step: StreamingStep, scale: float):
    """The window part's out (T, H, D) in q's dtype and lse (H, T) merged with the sink part; out in q's dtype."""
    so, sl = sink_attention(q_sinks, key_cache, value_cache, step, scale)
    merged, _ = merge_attention(out.to(so.dtype), lse.to(sl.dtype), so, sl)
    return merged.to(out.dtype)


__all__ = ["StreamingPolicy", "StreamingStep", "sink_attention", "merge_sink_part"]
