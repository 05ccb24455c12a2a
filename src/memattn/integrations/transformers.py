"""``attn_implementation="memattn"`` for Hugging Face transformers models, inference and training.

``register()`` adds two things under the name "memattn":

- a mask function (``AttentionMaskInterface``): ``hf_masks.compact_mask``, which hands attention a
  ``CompactMask`` (a window, the key padding, packed documents, or the mask function evaluated tile by tile),
  never a dense (B, 1, Sq, Sk) tensor;
- an attention function (``AttentionInterface``): HF hands it q (B, H, Sq, D), k/v (B, Hkv, Sk, D) and that
  mask; it runs ``memattn.attention`` (or ``memattn.attention_varlen`` for packed rows, so no tile ever pairs two
  documents) in memattn's layout (B, S, H, D) and returns (B, Sq, H, D), as HF expects.

Model options it honours: ``scaling``, ``softcap`` (Gemma 2), ``sliding_window`` (always, ANDed with the mask),
``s_aux`` (gpt-oss's learnable sinks, as ``sinks=``), and the ``cu_seq_lens_q/k`` keywords that
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` passes. ``dropout > 0`` in training is refused.
Works for any model routed through ``ALL_ATTENTION_FUNCTIONS``: checked on Llama, Mistral, Qwen2, Gemma 2,
GPT-2, gpt-oss and BERT.
"""
from __future__ import annotations

import torch

from ..masks import DenseMask, WindowMask, combine
from ..ops.dispatch import attention
from ..ops.varlen import attention_varlen
from .hf_masks import CompactMask, compact_mask, tighter_window

NAME = "memattn"


def _model_window(sliding_window, causal: bool) -> tuple:
    """The module's sliding window as (left, right): HF's ``kv > q - w`` is left = w - 1."""
    if not sliding_window:
        return (-1, 0 if causal else -1)
    w = int(sliding_window) - 1
    return (w, 0 if causal else w)


def _dense(mask: torch.Tensor, q, k) -> DenseMask:
    """A 4-D mask a caller built itself (boolean, or additive float with 0 = attend)."""
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask[..., :k.shape[1]]
    return DenseMask(mask, batch=q.shape[0], heads=q.shape[2], seqlen_q=q.shape[1], seqlen_k=k.shape[1])


def _packed(q, k, v, cu_seqlens: torch.Tensor, window, **kw):
    """Rows of several documents laid end to end: one varlen call, (B, S, H, D) in and out."""
    b, s = q.shape[:2]
    cu = cu_seqlens.to(device="cpu", dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    flat = [t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)]
    out = attention_varlen(*flat, cu, cu, longest, longest, window_size=window, **kw)
    return out.view(b, s, *out.shape[1:])


def memattn_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, s_aux=None, cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """HF attention function: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> ((B, Sq, H, D), None).

    attention_mask: a ``CompactMask`` (from the registered mask function), a 4-D bool/additive tensor (a model
    that built its own), or None (then causal when the module is causal and Sq > 1)."""
    if dropout and module.training:
        raise ValueError(f"memattn attention has no dropout (got dropout={dropout}); set the model's "
                         "attention_dropout to 0 or use model.eval()")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    causal_module = getattr(module, "is_causal", True)
    kw = dict(softmax_scale=scaling, softcap=softcap or 0.0, sinks=s_aux)
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if cu_seq_lens_k is not None and cu_seq_lens_q is not None and not torch.equal(
                cu_seq_lens_q.cpu(), cu_seq_lens_k.cpu()):
            raise ValueError("memattn packs queries and keys alike: cu_seq_lens_q and cu_seq_lens_k must be equal, "
                             f"got {cu_seq_lens_q.tolist()} and {cu_seq_lens_k.tolist()}")
        cu = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
        if q.shape[1] != k.shape[1] or q.shape[0] * q.shape[1] != int(cu[-1]):
            raise ValueError(f"cu_seq_lens end at {int(cu[-1])} tokens but the batch holds (B, Sq, Sk) = "
                             f"({q.shape[0]}, {q.shape[1]}, {k.shape[1]})")
        return _packed(q, k, v, cu, _model_window(sliding_window, causal_module), **kw), None
    module_window = _model_window(sliding_window, causal_module) if sliding_window else None
    if isinstance(attention_mask, CompactMask):
        attention_mask.check(q.shape[1], k.shape[1])
        if attention_mask.tiles is None:  # exact structure: the module's window folds into the mask's own
            own = _model_window(sliding_window, False)
            if attention_mask.documents is not None:
                window = tighter_window(attention_mask.window, own)
                return _packed(q, k, v, attention_mask.cu_seqlens, window, **kw), None
            mask, module_window = attention_mask.as_mask(own), None
        else:
            mask = attention_mask.tiles
    elif isinstance(attention_mask, torch.Tensor):
        mask = _dense(attention_mask, q, k)
    elif attention_mask is None:
        causal = q.shape[1] > 1 and causal_module
        mask = WindowMask(-1, 0) if causal else None
    else:
        raise TypeError(f"memattn attention takes a CompactMask, a 4-D tensor or None as attention_mask, "
                        f"got {type(attention_mask).__name__}")
    if module_window is not None:
        mask = combine(mask, WindowMask(*module_window))
    causal = isinstance(mask, WindowMask) and (mask.left, mask.right) == (-1, 0)
    out = attention(q, k, v, causal=causal, mask=None if causal else mask, **kw)
    return out, None


def register(name: str = NAME) -> str:
    """Register the attention and mask functions under `name`; return the name for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, memattn_attention)
    AttentionMaskInterface.register(name, compact_mask)
    return name


__all__ = ["register", "memattn_attention", "NAME", "CompactMask"]
