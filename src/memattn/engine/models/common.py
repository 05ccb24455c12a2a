"""What every model shares: the per-step batch metadata, the paged attention call, rotary embeddings."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...cache import PagedKVCache
from ...kernels import gemv
from ...ops.paged import PagedMetadata, paged_attention, paged_decode_step
from ..streaming import StreamingStep, merge_sink_part


@dataclass
class StepBatch:
    """One engine step, packed: the new tokens of every scheduled sequence back to back.

    input_ids, positions, slot_mapping: (T,) int64 (slot = block * block_size + offset, where the
    token's K/V is written). block_table: int32 (B, max_blocks). cache_seqlens: int32 (B,), context
    length of each sequence *including* its new tokens. cu_seqlens_q: int32 (B + 1,). logits_indices:
    (R,) rows of the packed tokens whose next-token logits are wanted. paged: those three validated once
    for the step (``memattn.ops.paged.paged_metadata``), shared by every layer's attention call.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    logits_indices: torch.Tensor
    paged: PagedMetadata | None = None
    # a pure decode step's attention bound once per (scale, window) by the first layer (``paged_decode_step``);
    # None marks a step it does not take
    decode_steps: dict = field(default_factory=dict, repr=False)
    # StreamingLLM (``engine.streaming``): the window W every layer attends with (block_table and cache_seqlens
    # then describe the window part), and the sink part's metadata (None without sinks)
    window: int | None = None
    streaming: StreamingStep | None = None


def paged_self_attention(q, k, v, batch: StepBatch, cache: PagedKVCache, layer: int, *, scale: float,
                         window: int | None = None, q_sinks=None):
    """Write the new k, v (T, Hkv, D) into the pool, then attend q (T, H, D) to each sequence's context.

    window W (transformers' ``sliding_window``): key j is visible to query i iff i - W < j <= i.
    StreamingLLM (``batch.window``, ``batch.streaming``): q attends to the window, q_sinks (q rotated at
    its cache positions) to the sinks, the two merged (``engine.streaming``).
    """
    cache.write(batch.slot_mapping, k, v, layer=layer)
    if batch.window is not None:  # the engine's streaming window (the model has none of its own)
        window = batch.window
    window_size = (-1, -1) if window is None else (window - 1, 0)
    kc, vc = cache.key_cache(layer), cache.value_cache(layer)
    if batch.streaming is not None:
        out, lse = paged_attention(q, kc, vc, batch.block_table, batch.cache_seqlens, cu_seqlens_q=batch.cu_seqlens_q,
                                   softmax_scale=scale, causal=True, window_size=window_size, return_lse=True,
                                   metadata=batch.paged)
        return merge_sink_part(out, lse, q_sinks, kc, vc, batch.streaming, scale)
    if batch.paged is not None:
        key = (scale, window_size)
        step = batch.decode_steps.get(key, False)
        if step is False:
            step = batch.decode_steps[key] = paged_decode_step(q, kc, vc, batch.paged, softmax_scale=scale,
                                                               window_size=window_size)
        if step is not None:
            return step(q, kc, vc)
    return paged_attention(q, cache.key_cache(layer), cache.value_cache(layer), batch.block_table,
                           batch.cache_seqlens, cu_seqlens_q=batch.cu_seqlens_q, softmax_scale=scale,
                           causal=True, window_size=window_size, metadata=batch.paged)


def linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """``module(x)`` without the module call: few-row CPU steps (decode) through ``kernels.gemv`` (which reads
    the weight once, and runs bfloat16 at memory speed), the rest through PyTorch."""
    return gemv.linear(x, module.weight, module.bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it: normalised in float32, rounded to x's dtype, times weight."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class FusedLinear(nn.Linear):
    """One ``nn.Linear`` standing for several of a checkpoint's projections that read the same input.

    ``parts``: [(checkpoint module name, out_features)], in output order; the weight is their rows
    concatenated, so one GEMM replaces several and the input is read once. The module owning it calls
    ``FusedLinear.load_parts(self)`` in its ``__init__``: then a state dict holding the parts (``q_proj.weight``,
    ``k_proj.weight``, ... beside the fused module) loads into the fused weight (and bias).
    ``split(y)``: y (..., sum(out_features)) -> the parts' outputs, views.
    """

    def __init__(self, in_features: int, parts, *, bias: bool):
        self.parts = [(name, int(n)) for name, n in parts]
        super().__init__(in_features, sum(n for _, n in self.parts), bias=bias)

    @staticmethod
    def load_parts(owner: nn.Module) -> None:
        """Make ``owner.load_state_dict`` concatenate the checkpoint's parts into owner's FusedLinear children.

        The hook sits on the owner: its own key check runs before its children's hooks would."""
        def hook(module, state_dict, prefix, *_):
            for child_name, child in module.named_children():
                if not isinstance(child, FusedLinear):
                    continue
                for kind in ("weight", "bias"):
                    keys = [f"{prefix}{name}.{kind}" for name, _ in child.parts]
                    if all(k in state_dict for k in keys):
                        state_dict[f"{prefix}{child_name}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
        owner.register_load_state_dict_pre_hook(hook)

    def split(self, y: torch.Tensor):
        return y.split([n for _, n in self.parts], dim=-1)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) float32, with "linear" or "llama3" scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype):
    """cos, sin (T, 1, head_dim / 2) of positions (T,) x inv_freq (head_dim / 2,): computed once per step."""
    freqs = (positions.to(torch.float32)[:, None] * inv_freq[None, :])[:, None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (T, heads, head_dim) by the half-size cos, sin (T, 1, head_dim / 2) of ``rope_cos_sin``
    (the rotate-half convention: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin on the two halves)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out


__all__ = ["StepBatch", "FusedLinear", "linear", "rms_norm", "paged_self_attention", "rope_inv_freq", "rope_cos_sin", "apply_rope"]
