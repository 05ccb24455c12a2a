"""memattn: memory-efficient attention for PyTorch.

Layout: (batch, seqlen, heads, head_dim) everywhere; FlashAttention's argument names.
"""
from . import cache, masks, memory, reference
from .ops.dispatch import attention
from .ops.linear import LinearAttentionState, linear_attention
from .ops.merge import merge_attention
from .ops.paged import paged_attention
from .ops.varlen import attention_varlen
from .kernels import use_backend

__version__ = "0.1.0"



def __getattr__(name):
    """The serving engine loads on first use (``memattn.LLM``, ``memattn.SamplingParams``)."""
    if name in ("LLM", "SamplingParams"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'memattn' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "use_backend", "attention", "attention_varlen", "merge_attention", "paged_attention", "linear_attention",
           "LinearAttentionState", "cache", "masks", "memory", "reference", "__version__"]
