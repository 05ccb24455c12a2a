"""Llama family forward pass (Llama 2/3 with GQA and RoPE scaling, Mistral's sliding window, Qwen2's qkv bias).

Module names follow Hugging Face's checkpoints, so a safetensors state dict loads as is. Tokens are packed
(T, hidden): one step holds prefill chunks and decodes of many sequences; attention goes through the paged pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import gemv
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
    """forward(batch, cache) -> logits (R, vocab) of the rows ``batch.logits_indices``."""

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
