"""The tile primitive: ``attend(q_tile, k_tile, v_tile, mask/bias) -> (out_tile, lse_tile)`` and its backward.

Three implementations share one signature (see ``torch_tiles``): ``"torch"`` (readable, any
dtype and device), ``"cpu_flash"`` (PyTorch's fused CPU flash kernel) and ``"triton"`` (fused
Triton kernels for CUDA tensors; optional extra ``memattn[gpu]``). ``select`` picks one.
The Triton package is imported only when it is chosen, so triton stays optional.
"""
from __future__ import annotations

import importlib.util

from . import cpu_flash, torch_tiles
from .torch_tiles import compute_dtype

IMPLS = {"torch": torch_tiles, "cpu_flash": cpu_flash}
NAMES = ("cpu_flash", "torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_tiles():
    """The Triton tile module (``memattn.kernels.triton``), imported on first use."""
    from . import triton as triton_kernels
    return triton_kernels


def _triton_applies(q) -> bool:
    return q.is_cuda and q.dtype in triton_tiles().SUPPORTED_DTYPES


def name_of(tiles) -> str:
    """The implementation name of a tile module (``"torch"``, ``"cpu_flash"`` or ``"triton"``)."""
    for name, mod in IMPLS.items():
        if tiles is mod:
            return name
    return "triton"


def select(q, *, softcap: float = 0.0, impl: str | None = None):
    """Return the tile module to use: `impl` if given (validated), else the fastest that applies:
    Triton for CUDA tensors of float16/bfloat16/float32 when triton is installed, the fused CPU
    kernel for CPU tensors without softcap, else the torch tile."""
    if impl is not None:
        if impl not in NAMES:
            raise ValueError(f"unknown tile implementation {impl!r}; choose from {list(NAMES)}")
        if impl == "cpu_flash" and (not cpu_flash.available(q) or softcap):
            raise ValueError("the cpu_flash tile needs CPU tensors and no softcap")
        if impl == "triton":
            if not triton_installed():
                raise ValueError("the triton tile needs triton: pip install 'memattn[gpu]'")
            mod = triton_tiles()
            if not mod.available(q):
                raise ValueError(f"the triton tile needs CUDA tensors of {[str(d) for d in mod.SUPPORTED_DTYPES]} "
                                 f"(or CPU tensors under TRITON_INTERPRET=1), got {q.device} {q.dtype}")
            return mod
        return IMPLS[impl]
    if q.is_cuda and triton_installed() and _triton_applies(q):
        return triton_tiles()
    if cpu_flash.available(q) and not softcap:
        return cpu_flash
    return torch_tiles


__all__ = ["select", "compute_dtype", "torch_tiles", "cpu_flash", "IMPLS", "NAMES", "name_of", "triton_installed",
           "triton_tiles"]
