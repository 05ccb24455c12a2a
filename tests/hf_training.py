"""Shared by the training tests: tiny random-init models of five architectures, a float64 oracle attention
registered with transformers, and the FA-rule check of a loss and every parameter's gradient.

The oracle is transformers' own dense mask (``sdpa_mask``) with memattn's materialised float64 reference
attention; HF eager is the naive path (it takes its softmax in float32 even for float64 models, so it is not
itself an oracle: FlashAttention's rule bounds our error by twice its error plus a float64 floor).
"""
from __future__ import annotations

import torch
import transformers

from memattn.engine.models import PRESETS
from memattn.integrations.transformers import register

NAME = register()
ORACLE = "memattn_oracle64"
NO_DROPOUT = dict(attention_dropout=0.0)
TRAIN_CONFIGS = {
    "llama": dict(PRESETS["tiny-llama"], **NO_DROPOUT),
    # layer 0 full, layer 1 sliding (window 6 < the sequences here)
    "qwen2": dict(PRESETS["tiny-qwen2"], use_sliding_window=True, sliding_window=6, max_window_layers=1, **NO_DROPOUT),
    "gemma2": dict(model_type="gemma2", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                   attn_logit_softcapping=5.0, final_logit_softcapping=None, max_position_embeddings=512, **NO_DROPOUT),
    "gpt2": dict(PRESETS["tiny-gpt2"], attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "gpt_oss": dict(model_type="gpt_oss", vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6, num_local_experts=2,
                    num_experts_per_tok=1, max_position_embeddings=512, **NO_DROPOUT),
}


def _oracle_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, softcap=None,
                      s_aux=None, **kwargs):
    from memattn import reference

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    mask = None if attention_mask is None else attention_mask[..., :k.shape[1]]
    if mask is None and q.shape[1] > 1:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(k.shape[1] - q.shape[1])
    return reference.attention(q, k, v, mask=mask, softmax_scale=scaling, softcap=softcap or 0.0, sinks=s_aux), None


def _register_oracle():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, sdpa_mask)


_register_oracle()


def train_models(arch, impls, seed):
    """One float64 random-init model per attention implementation, all with the same weights."""
    torch.manual_seed(seed)
    extra = dict(experts_implementation="eager") if arch == "gpt_oss" else {}  # grouped_mm has no float64
    models = [transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TRAIN_CONFIGS[arch]),
                                                            attn_implementation=impl, dtype=torch.float64, **extra)
              for impl in impls]
    if arch == "gpt_oss":  # sinks start at zero-ish: make them matter
        with torch.no_grad():
            for layer in models[0].model.layers:
                layer.self_attn.sinks.normal_()
    for m in models:
        m.load_state_dict(models[0].state_dict())
        m.train()
        assert m.config._attn_implementation in impls
    return models


def summed_loss(model, labels, **batch):
    """The causal-LM loss (labels shifted, -100 ignored), summed, in the model's float64: transformers' own
    loss path takes ``logits.float()`` and so would round a float64 model's loss to float32."""
    logits = model(**batch, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


def grads_of(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, **batch):
    return grads_of(model, lambda: summed_loss(model, **batch))


def assert_training_matches(name, ours, oracle, naive, seed):
    """FA rule on the loss and on every parameter's gradient (factor 3), float64 floors: a network's
    gradient is a chain of sums; the floor counts the terms of the longest one (tokens x width) at the
    gradient's own magnitude."""
    from conftest import assert_fa_rule, fa_floor

    (lo, go), (lr, gr), (ln, gn) = ours, oracle, naive
    assert go.keys() == gr.keys(), f"{name}: gradients reach {sorted(set(go) ^ set(gr))} on one side only"
    n = 4096
    assert_fa_rule(f"{name} loss", lo, lr, ln if torch.isfinite(ln) else None,
                   floor=fa_floor(torch.float64, abs(float(lr)), n), seed=seed)
    for p in gr:
        naive_p = gn[p] if torch.isfinite(gn[p]).all() else None
        assert_fa_rule(f"{name} grad {p}", go[p], gr[p], naive_p, factor=3.0,
                       floor=fa_floor(torch.float64, gr[p].abs().max().item(), n), seed=seed)


