"""memattn: memory-efficient attention for PyTorch.

Layout: (batch, seqlen, heads, head_dim) everywhere; FlashAttention's argument names.
"""
from . import masks, reference
from .ops.dispatch import attention
from .ops.linear import LinearAttentionState, linear_attention
from .ops.merge import merge_attention

__version__ = "0.1.0"

__all__ = ["attention", "merge_attention", "masks", "reference", "__version__"]
__all__ += ["linear_attention", "LinearAttentionState"]
