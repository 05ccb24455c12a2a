"""Contiguous KV caches for one attention layer: a growing/pre-allocated cache and a sliding-window ring.

Layout (batch, seqlen, kv_heads, head_dim), all rows of the batch at the same length. Use one cache per
layer. ``update(k, v)`` stores the new tokens and returns the keys and values the new queries attend to.
"""
from __future__ import annotations

import torch


def _check_new(name_k, k, v, batch, kv_heads, head_dim):
    if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (batch, kv_heads, head_dim):
        raise ValueError(f"{name_k} and v must be (batch, new_tokens, kv_heads, head_dim) = "
                         f"({batch}, n, {kv_heads}, {head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")


class _BatchCache:
    """Shared storage bookkeeping: a (batch, capacity, kv_heads, head_dim) pair of buffers."""

    def __init__(self, batch, kv_heads, head_dim, capacity, dtype, device):
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self._k = torch.empty((batch, capacity, kv_heads, head_dim), dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self.seqlen = 0  # tokens seen so far (absolute position of the next token)

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row b becomes the old row beam_idx[b]."""
        if beam_idx.dim() != 1 or beam_idx.shape[0] != self.batch:
            raise ValueError(f"beam_idx must be ({self.batch},), got {tuple(beam_idx.shape)}")
        idx = beam_idx.to(device=self._k.device, dtype=torch.int64)
        self._k = self._k.index_select(0, idx)
        self._v = self._v.index_select(0, idx)


class KVCache(_BatchCache):
    """Append-only KV cache of one layer.

    max_seqlen given: pre-allocated to that length (appending past it raises). None: grows by
    doubling from ``initial_capacity`` (amortised O(1) per token).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, *, max_seqlen: int | None = None,
                 initial_capacity: int = 256, dtype=torch.float32, device="cpu"):
        self.max_seqlen = max_seqlen
        super().__init__(batch, kv_heads, head_dim, max_seqlen if max_seqlen is not None else initial_capacity,
                         dtype, device)

    @property
    def keys(self) -> torch.Tensor:
        """(batch, seqlen, kv_heads, head_dim) view."""
        return self._k[:, :self.seqlen]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :self.seqlen]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (batch, n, kv_heads, head_dim); return all keys and values (views), new ones included.
        Attend with ``causal=True`` (bottom-right aligned)."""
        _check_new("k", k, v, self.batch, self.kv_heads, self.head_dim)
        end = self.seqlen + k.shape[1]
        if end > self.capacity:
            if self.max_seqlen is not None:
                raise ValueError(f"cache is full: {self.seqlen} + {k.shape[1]} tokens > max_seqlen {self.max_seqlen}")
            grow = max(end, 2 * self.capacity)
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = old.new_empty((self.batch, grow, self.kv_heads, self.head_dim))
                new[:, :self.seqlen] = old[:, :self.seqlen]
                setattr(self, name, new)
        self._k[:, self.seqlen:end] = k
        self._v[:, self.seqlen:end] = v
        self.seqlen = end
        return self.keys, self.values

    def crop(self, seqlen: int) -> None:
        """Keep the first `seqlen` tokens (e.g. roll back rejected speculative tokens)."""
        if not 0 <= seqlen <= self.seqlen:
            raise ValueError(f"crop length must be in [0, {self.seqlen}], got {seqlen}")
        self.seqlen = seqlen


class SlidingWindowKVCache(_BatchCache):
    """Ring buffer of ``window`` slots (Mistral): token i lives in slot i mod window.

    Each query sees itself and the window - 1 tokens before it: attend with
    ``causal=True, window_size=(window - 1, 0)`` to what ``update`` returns. Memory stays
    ``window`` tokens however long the sequence grows.
    """

    def __init__(self, batch: int, window: int, kv_heads: int, head_dim: int, *, dtype=torch.float32, device="cpu"):
        super().__init__(batch, kv_heads, head_dim, window, dtype, device)
        self.window = window

    @property
    def window_size(self) -> tuple[int, int]:
        """The ``window_size`` argument that goes with this cache."""
        return (self.window - 1, 0)

    def _ordered(self, start: int, end: int):
        """Tokens [start, end) (all still in the ring) in chronological order."""
        idx = torch.arange(start, end, device=self._k.device) % self.window
        return self._k.index_select(1, idx), self._v.index_select(1, idx)

    @property
    def keys(self) -> torch.Tensor:
        """The last min(seqlen, window) keys in chronological order (a copy)."""
        return self._ordered(max(0, self.seqlen - self.window), self.seqlen)[0]

    @property
    def values(self) -> torch.Tensor:
        return self._ordered(max(0, self.seqlen - self.window), self.seqlen)[1]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (batch, n, kv_heads, head_dim); return the keys and values the n new queries need.

        One new token: the ring itself (a view of its filled slots, in slot order: every key there is
        in the query's window, so order does not matter). Several: the window - 1 tokens before them in
        chronological order followed by the new ones (a copy), so the bottom-right aligned window is right.
        """
        _check_new("k", k, v, self.batch, self.kv_heads, self.head_dim)
        n, w = k.shape[1], self.window
        if n != 1:
            ck, cv = self._ordered(max(0, self.seqlen - (w - 1)), self.seqlen)
            ctx = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        keep = min(n, w)  # only the last `window` new tokens survive in the ring
        slots = torch.arange(self.seqlen + n - keep, self.seqlen + n, device=self._k.device) % w
        self._k.index_copy_(1, slots, k[:, n - keep:].to(self._k.dtype))
        self._v.index_copy_(1, slots, v[:, n - keep:].to(self._v.dtype))
        self.seqlen += n
        if n != 1:
            return ctx
        filled = min(self.seqlen, w)
        return self._k[:, :filled], self._v[:, :filled]


__all__ = ["KVCache", "SlidingWindowKVCache"]
