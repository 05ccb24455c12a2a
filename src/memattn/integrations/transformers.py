"""``attn_implementation="memattn"`` for Hugging Face transformers models.

``register()`` adds two things under the name "memattn":

- an attention function (``AttentionInterface``): HF hands it q (B, H, Sq, D), k/v (B, Hkv, Sk, D) and a mask;
  it runs ``memattn.attention`` in memattn's layout (B, S, H, D) and returns (B, Sq, H, D), as HF expects;
- a mask function (``AttentionMaskInterface``), transformers' boolean ``sdpa_mask``: without one, HF passes
  ``attention_mask=None`` and causal masking would be silently dropped. ``sdpa_mask`` still returns None when
  the mask is plain causal (or plain full) with no padding; the function then applies ``causal`` itself
  when the module is causal (bottom-right aligned, which is HF's alignment for a cache), and the module's
  sliding window if it has one.

Works for any model routed through ``ALL_ATTENTION_FUNCTIONS``: checked on Llama, Mistral, Qwen2, GPT-2 and
BERT. Inference only in spirit (dropout must be 0), though memattn's kernels are differentiable.
"""
from __future__ import annotations

import torch

from ..ops.dispatch import attention

NAME = "memattn"


def memattn_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, **kwargs):
    """HF attention function: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> ((B, Sq, H, D), None)."""
    if dropout and module.training:
        raise ValueError("memattn attention has no dropout; use model.eval() or attention_dropout=0")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    mask = attention_mask
    causal = False
    window = (-1, -1)
    if mask is None:
        causal = q.shape[1] > 1 and getattr(module, "is_causal", True)
        if causal and sliding_window:
            window = (sliding_window - 1, 0)
    else:
        if mask.dtype != torch.bool:  # an additive float mask (eager_mask): 0 = attend
            mask = mask > torch.finfo(mask.dtype).min / 2
        mask = mask[..., :k.shape[1]]
    out = attention(q, k, v, causal=causal, softmax_scale=scaling, window_size=window, mask=mask,
                    softcap=softcap or 0.0)
    return out, None


def register(name: str = NAME) -> str:
    """Register the attention and mask functions under `name`; return the name for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, memattn_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


__all__ = ["register", "memattn_attention", "NAME"]
