"""GPT-2 forward pass: learned absolute positions, LayerNorm, fused qkv Conv1D (weights stored (in, out))."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .common import StepBatch, paged_self_attention


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 projection: y = x @ weight + bias with weight (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.c_attn = Conv1D(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size)
        self.layer, self.heads, self.head_dim = layer, cfg.num_heads, cfg.head_dim

    def forward(self, x, batch: StepBatch, cache):
        t, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=1)
        shape = (t, self.heads, self.head_dim)
        out = paged_self_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), batch, cache, self.layer,
                                   scale=self.head_dim ** -0.5)
        return self.c_proj(out.reshape(t, e))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, batch, cache):
        x = x + self.attn(self.ln_1(x), batch, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class GPT2LMHeadModel(nn.Module):
    """forward(batch, cache) -> logits (R, vocab) of the rows ``batch.logits_indices``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache) -> torch.Tensor:
        tr = self.transformer
        x = tr.wte(batch.input_ids) + tr.wpe(batch.positions)
        for block in tr.h:
            x = block(x, batch, cache)
        x = tr.ln_f(x.index_select(0, batch.logits_indices))
        return self.lm_head(x).float()


__all__ = ["GPT2LMHeadModel"]
