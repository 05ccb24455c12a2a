"""Triton kernels: the tile primitive (``tiles``) and paged decode (``paged``).

Importing this package imports triton; ``memattn.kernels`` only does so when a Triton path is
chosen (CUDA tensors, or ``impl="triton"``), so triton stays an optional extra (``pip install
memattn[gpu]``). Set ``TRITON_INTERPRET=1`` before triton is first imported to run the kernels
on CPU tensors (slow; for tests).
"""
from __future__ import annotations

from .paged import paged_decode
from .tiles import SUPPORTED_DTYPES, available, interpreting, tile_backward, tile_forward

__all__ = ["tile_forward", "tile_backward", "paged_decode", "available", "interpreting", "SUPPORTED_DTYPES"]
