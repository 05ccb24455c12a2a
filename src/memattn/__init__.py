"""memattn: memory-efficient attention for PyTorch.

Layout: (batch, seqlen, heads, head_dim) everywhere; FlashAttention's argument names.
"""
from . import cache, masks, reference
from .ops.dispatch import attention
from .ops.merge import merge_attention
from .ops.paged import paged_attention

__version__ = "0.1.0"

__all__ = ["attention", "merge_attention", "paged_attention", "cache", "masks", "reference", "__version__"]
