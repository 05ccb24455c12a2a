"""The tile primitive: ``attend(q_tile, k_tile, v_tile, mask/bias) -> (out_tile, lse_tile)`` and its backward.

Two implementations share one signature (see ``torch_tiles``): ``"torch"`` (readable, any
dtype and device) and ``"cpu_flash"`` (PyTorch's fused CPU flash kernel). ``select`` picks one.
"""
from __future__ import annotations

from . import cpu_flash, torch_tiles
from .torch_tiles import compute_dtype

IMPLS = {"torch": torch_tiles, "cpu_flash": cpu_flash}


def select(q, *, softcap: float = 0.0, impl: str | None = None):
    """Return the tile module to use: `impl` if given (validated), else the fastest that applies."""
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"unknown tile implementation {impl!r}; choose from {sorted(IMPLS)}")
        if impl == "cpu_flash" and (not cpu_flash.available(q) or softcap):
            raise ValueError("the cpu_flash tile needs CPU tensors and no softcap")
        return IMPLS[impl]
    if cpu_flash.available(q) and not softcap:
        return cpu_flash
    return torch_tiles


__all__ = ["select", "compute_dtype", "torch_tiles", "cpu_flash", "IMPLS"]
