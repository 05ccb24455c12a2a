"""A whole Llama-family decode step in one native call (``kernels/csrc/decode_step.c``).

At batch 1 a decode step is bound by reading the weights once; driven layer by layer from Python it also
pays ~300 small torch ops and ctypes calls (about a third of a float32 SmolLM2-135M step on a 2-core EPYC).
``LlamaStep`` holds the addresses of a model's weights, gathered once; ``LlamaStep.run`` then runs every
layer (norms, GEMVs, RoPE, the cache write, paged decode attention, the MLP) and the LM head in C, with the
rounding points of the Python path (``engine/models/llama.py``, the reference it is tested against).

It covers pure decode steps of at most ``MAX_ROWS`` rows on the CPU, in float32, bfloat16 or float16, with a
plain full-width paged cache in the model's dtype; the caller keeps the Python path for everything else
(``LlamaStep.supports``).
"""
from __future__ import annotations

import ctypes

import torch

from . import native
from .gemv import DTYPES
from .paged_native import _splits

MAX_ROWS = 8


class LlamaStep:
    """The native decode step of one Llama-family model.

    Args:
        layers: per layer a dict of tensors (CPU, contiguous, the model's dtype): ``ln1``, ``wqkv``
            ((H + 2 Hkv) hd, hidden), ``wo`` (hidden, H hd), ``ln2``, ``wgu`` (2 I, hidden: gate rows then up
            rows), ``wdown`` (hidden, I), and optional biases ``bqkv``, ``bo``, ``bgu``, ``bdown`` (any float
            dtype, kept as float32 copies); and ``window`` (None or W: key j visible iff i - W < j <= i).
        norm, lm_head: the final norm weight (hidden,) and the LM head (vocab, hidden).
        num_heads, num_kv_heads, head_dim, eps, scale: the attention geometry, RMSNorm epsilon, softmax scale.
    Raises ValueError naming the sizes when a tensor does not fit, TypeError for a dtype it does not take.
    """

    _WEIGHTS = ("ln1", "wqkv", "bqkv", "wo", "bo", "ln2", "wgu", "bgu", "wdown", "bdown")

    def __init__(self, layers, norm, lm_head, *, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 scale: float):
        lib = native.library()
        if lib is None:
            raise RuntimeError("the native kernels could not be built here (see the warning); no native decode step")
        if lm_head.dtype not in DTYPES:
            raise TypeError(f"the native decode step takes float32, bfloat16 or float16 weights, got {lm_head.dtype}")
        self.dtype, self.code = lm_head.dtype, DTYPES[lm_head.dtype]
        h, hkv, d = num_heads, num_kv_heads, head_dim
        hidden = lm_head.shape[1]
        inter = layers[0]["wdown"].shape[1]
        shapes = {"ln1": (hidden,), "ln2": (hidden,), "wqkv": ((h + 2 * hkv) * d, hidden), "wo": (hidden, h * d),
                  "wgu": (2 * inter, hidden), "wdown": (hidden, inter), "bqkv": ((h + 2 * hkv) * d,),
                  "bo": (hidden,), "bgu": (2 * inter,), "bdown": (hidden,)}
        fields = lib.decode_step_layer_fields()
        if fields != len(self._WEIGHTS) + 1:
            raise RuntimeError(f"native decode step takes {fields} fields per layer, this binding {len(self._WEIGHTS) + 1}")
        self._keep, rows = [], []
        for i, layer in enumerate(layers):
            row = []
            for name in self._WEIGHTS:
                t = layer.get(name)
                if t is None:
                    if name.startswith("b"):
                        row.append(0)
                        continue
                    raise ValueError(f"layer {i}: no {name}")
                if tuple(t.shape) != shapes[name]:
                    raise ValueError(f"layer {i}: {name} must be {shapes[name]}, got {tuple(t.shape)}")
                if name.startswith("b"):
                    t = t.detach().to(torch.float32).contiguous()
                elif t.dtype != self.dtype or t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"layer {i}: {name} must be a contiguous CPU {self.dtype} tensor, got "
                                     f"{t.dtype} on {t.device}")
                self._keep.append(t)
                row.append(t.data_ptr())
            rows.append(row + [0])  # the visible-range starts, filled in per step
        for name, t, shape in (("norm", norm, (hidden,)), ("lm_head", lm_head, tuple(lm_head.shape))):
            if tuple(t.shape) != shape or t.dtype != self.dtype or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous {self.dtype} tensor {shape}, got {t.dtype} "
                                 f"{tuple(t.shape)}")
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.windows = [layer.get("window") for layer in layers]
        self._lefts = [-1 if w is None else w - 1 for w in self.windows]
        self._starts_ptrs = None
        self.norm, self.lm_head = norm, lm_head
        self.geometry = (h, hkv, d, hidden, inter, lm_head.shape[0])
        self.eps, self.scale = float(eps), float(scale)

    def supports(self, num_rows: int, kv: torch.Tensor) -> bool:
        """Whether ``run`` takes a step of `num_rows` rows on the pool `kv` (2, L, blocks, bs, Hkv, hd)."""
        h, hkv, d = self.geometry[:3]
        return (1 <= num_rows <= MAX_ROWS and kv.device.type == "cpu" and kv.dtype == self.dtype
                and kv.is_contiguous() and kv.dim() == 6 and kv.shape[0] == 2 and kv.shape[1] == len(self.windows)
                and tuple(kv.shape[4:]) == (hkv, d))

    def run(self, x, cos, sin, slots, kv, block_table, ranges) -> torch.Tensor:
        """One decode step of M rows; returns logits (M, vocab) float32 (rounded to the model's dtype).

        x (M, hidden): the new tokens' embeddings (overwritten: the residual stream). cos, sin: (M, 1, hd / 2)
        from ``rope_cos_sin``. slots (M,) int64: where each row's k/v go. kv: the pool (2, L, blocks, bs, Hkv,
        hd). block_table int32 (M, max_blocks). ranges(left): int64 (M, 1, 2) visible key ranges [start, len) for
        window left edge `left` (-1, or W - 1): ``PagedMetadata.decode_ranges``.
        The caller has validated slots, table and ranges (``paged_metadata`` and ``PagedKVCache.write`` do).
        """
        m = x.shape[0]
        h, hkv, d, hidden, inter, vocab = self.geometry
        if not self.supports(m, kv) or tuple(x.shape) != (m, hidden) or x.dtype != self.dtype or not x.is_contiguous():
            raise ValueError(f"the native decode step takes x (<= {MAX_ROWS}, {hidden}) {self.dtype} and a contiguous "
                             f"{self.dtype} pool (2, {len(self.windows)}, blocks, bs, {hkv}, {d}); got x "
                             f"{tuple(x.shape)} {x.dtype}, pool {tuple(kv.shape)} {kv.dtype}")
        nb, bs = kv.shape[2], kv.shape[3]
        full = ranges(-1)  # the widest range: the split plan covers every layer's
        lens = full[:, 0, 1].contiguous()
        starts = {}  # window left edge -> the rows' first visible keys (alive until the call returns)
        for left in self._lefts:
            if left not in starts:
                starts[left] = ranges(left)[:, 0, 0].contiguous()
        ptrs = [starts[left].data_ptr() for left in self._lefts]
        if ptrs != self._starts_ptrs:
            self.table[:, -1] = torch.tensor(ptrs, dtype=torch.int64)
            self._starts_ptrs = ptrs
        max_blocks = int(((lens + bs - 1) // bs - full[:, 0, 0] // bs).max())
        nsplit, per = _splits(m, max_blocks, bs, torch.get_num_threads())
        table = block_table.to(torch.int32).contiguous()
        c, s = cos.reshape(m, d // 2).contiguous(), sin.reshape(m, d // 2).contiguous()
        slots = slots.to(torch.int64).contiguous()
        logits = torch.empty((m, vocab), dtype=torch.float32)
        rc = native.library().llama_decode_step(
            self.code, m, len(self.windows), hidden, h, hkv, d, inter, self.table.data_ptr(), self.eps, x.data_ptr(),
            c.data_ptr(), s.data_ptr(), slots.data_ptr(), kv.data_ptr(), nb, bs, table.data_ptr(), table.shape[1],
            lens.data_ptr(), self.scale, nsplit, per, self.norm.data_ptr(), self.lm_head.data_ptr(), vocab,
            logits.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native decode step failed (code {rc}) on rows={m} blocks={nb} block_size={bs}")
        return logits


__all__ = ["LlamaStep", "MAX_ROWS"]
