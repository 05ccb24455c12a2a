"""Llama family forward pass (Llama 2/3 with GQA and RoPE scaling, Mistral's sliding window, Qwen2's qkv bias).

Module names follow Hugging Face's checkpoints, so a safetensors state dict loads as is. Tokens are packed
(T, hidden): one step holds prefill chunks and decodes of many sequences; attention goes through the paged pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import gemv
from ...kernels.decode_step import LlamaStep
from ..config import ModelConfig
from .common import (FusedLinear, StepBatch, apply_rope, linear, paged_self_attention, rms_norm, rope_cos_sin,
                     rope_inv_freq)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    """Checkpoint's q_proj, k_proj, v_proj load into one fused ``qkv_proj`` (one GEMM per layer)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, [("q_proj", h * d), ("k_proj", hkv * d), ("v_proj", hkv * d)],
                                    bias=cfg.qkv_bias)
        FusedLinear.load_parts(self)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        self.shape = (h, hkv, d)
        self.layer, self.window, self.scale = layer, cfg.window(layer), d ** -0.5

    def forward(self, x, cos, sin, batch: StepBatch, cache):
        h, hkv, d = self.shape
        t = x.shape[0]
        qkv = linear(x, self.qkv_proj).view(t, h + 2 * hkv, d)
        qk = apply_rope(qkv[:, :h + hkv], cos, sin)  # q and k heads rotated together
        # StreamingLLM: q once more at its cache positions, for the sinks (engine.streaming)
        q_sinks = None if batch.streaming is None else apply_rope(qkv[:, :h], *batch.streaming.rope)
        out = paged_self_attention(qk[:, :h], qk[:, h:], qkv[:, h + hkv:], batch, cache, self.layer,
                                   scale=self.scale, window=self.window, q_sinks=q_sinks)
        return linear(out.reshape(t, h * d), self.o_proj)


class LlamaMLP(nn.Module):
    """Checkpoint's gate_proj and up_proj load into one fused ``gate_up_proj``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"llama MLP supports hidden_act 'silu', got {cfg.hidden_act!r}")
        n = cfg.intermediate_size
        self.gate_up_proj = FusedLinear(cfg.hidden_size, [("gate_proj", n), ("up_proj", n)], bias=cfg.mlp_bias)
        FusedLinear.load_parts(self)
        self.down_proj = nn.Linear(n, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return linear(gemv.silu_mul(linear(x, self.gate_up_proj)), self.down_proj)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, cos, sin, batch, cache):
        x = x.clone()
        return x.add_(self.forward_fused(x, None, cos, sin, batch, cache))

    def forward_fused(self, x, delta, cos, sin, batch, cache):
        """The model's running residual x (T, hidden), updated in place: x += delta (the previous layer's MLP
        output, None for the first layer), then this layer's attention added; returns this layer's MLP output
        (the next layer, or the final norm, adds it: each residual add fused with the norm after it)."""
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        a = self.self_attn.forward(gemv.add_rms_norm(x, delta, ln1.weight, ln1.eps), cos, sin, batch, cache)
        return self.mlp.forward(gemv.add_rms_norm(x, a, ln2.weight, ln2.eps))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(batch, cache) -> logits (R, vocab) of the rows ``batch.logits_indices``.

    A pure decode step of few rows on the CPU runs as one native call (``kernels.decode_step``) when
    ``native_decode`` is true (the default); everything else, and every step with it false, runs the layers
    from Python (``forward_layers``, the reference the native step is tested against)."""

    native_decode = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache) -> torch.Tensor:
        if self.native_decode:
            logits = self._native_decode(batch, cache)
            if logits is not None:
                return logits
        return self.forward_layers(batch, cache)

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: the weights move, the bound addresses go
        self._native_step = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copy.deepcopy, pickling: a copy binds its own weights on its first step
        state = super().__getstate__()
        state["_native_step"] = None
        return state

    def _native_binding(self):
        """The ``LlamaStep`` of the current weights (rebuilt when a weight's storage changed), or None where the
        native kernels cannot be built or the weights are not CPU tensors of a dtype it takes."""
        bound = getattr(self, "_native_step", None)
        if bound is not None:
            step, params, ptrs = bound
            if step is None or [p.data_ptr() for p in params] == ptrs:
                return step
        layers, params = [], []
        for i, layer in enumerate(self.model.layers):
            att, mlp = layer.self_attn, layer.mlp
            parts = dict(ln1=layer.input_layernorm.weight, wqkv=att.qkv_proj.weight, bqkv=att.qkv_proj.bias,
                         wo=att.o_proj.weight, bo=att.o_proj.bias, ln2=layer.post_attention_layernorm.weight,
                         wgu=mlp.gate_up_proj.weight, bgu=mlp.gate_up_proj.bias, wdown=mlp.down_proj.weight,
                         bdown=mlp.down_proj.bias)
            params += [t for t in parts.values() if t is not None]
            layers.append(dict(parts, window=self.config.window(i)))
        params += [self.model.norm.weight, self.lm_head.weight]
        cfg = self.config
        try:
            step = LlamaStep([{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
                              for d in layers], self.model.norm.weight.detach(), self.lm_head.weight.detach(),
                             num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                             eps=cfg.norm_eps, scale=self.model.layers[0].self_attn.scale)
        except (RuntimeError, TypeError, ValueError):  # no compiler, a device or dtype it does not take
            step = None
        self._native_step = (step, params, [p.data_ptr() for p in params])
        return step

    def _native_decode(self, batch: StepBatch, cache):
        """Logits of a pure decode step through the native step, or None where it does not take the step."""
        md, t = batch.paged, batch.input_ids.shape[0]
        # StreamingLLM (batch.window, batch.streaming: engine.streaming) runs layer by layer: its window and sink
        # part are applied per layer from Python
        if batch.window is not None or batch.streaming is not None or md is None or len(md.decode) != t or md.decode_q_rows is not None or batch.logits_indices.shape[0] != t \
                or batch.input_ids.device.type != "cpu":
            return None
        step = self._native_binding()
        kv = getattr(cache, "kv", None)
        if step is None or kv is None or not step.supports(t, kv) or (md.num_blocks, md.block_size) != kv.shape[2:4]:
            return None
        slots = batch.slot_mapping
        if t and (int(slots.min()) < 0 or int(slots.max()) >= kv.shape[2] * kv.shape[3]):
            raise ValueError(f"slot_mapping out of range: the pool has {kv.shape[2] * kv.shape[3]} slots, got "
                             f"{slots.tolist()}")
        x = self.model.embed_tokens(batch.input_ids).contiguous()
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, x.dtype)
        return step.run(x, cos, sin, slots, kv, md.decode_table, md.decode_ranges)

    def forward_layers(self, batch: StepBatch, cache) -> torch.Tensor:
        """The step layer by layer from Python (any batch; the reference of the native decode step)."""
        x = self.model.embed_tokens(batch.input_ids)
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, x.dtype)
        if batch.streaming is not None:
            batch.streaming.rope = rope_cos_sin(batch.streaming.sink_positions, self.inv_freq, x.dtype)
        delta = None
        for layer in self.model.layers:  # no module-call overhead (no hooks are used here)
            delta = layer.forward_fused(x, delta, cos, sin, batch, cache)
        if x.shape[0] != batch.logits_indices.shape[0]:  # else every row is sampled (a decode step)
            x, delta = x.index_select(0, batch.logits_indices), delta.index_select(0, batch.logits_indices)
        norm = self.model.norm
        return linear(gemv.add_rms_norm(x, delta, norm.weight, norm.eps), self.lm_head).float()


__all__ = ["LlamaForCausalLM"]
