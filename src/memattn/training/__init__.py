"""Training at long context: memory-lean losses and one call to switch a transformers model.

- ``linear_cross_entropy``: the LM head's cross-entropy a chunk of rows at a time, without the N x V logits;
- ``enable(model, attention=..., checkpointing=..., loss=...)``: memattn attention, activation checkpointing
  of every k-th layer and the chunked loss on a transformers causal LM.
"""
from .enable import enable
from .losses import linear_cross_entropy

__all__ = ["enable", "linear_cross_entropy"]
