"""The tile primitive and the paged-decode kernels, each described by one capability record.

A *tile backend* implements ``attend(q_tile, k_tile, v_tile, mask/bias) -> (out, lse)`` and its
backward (the contract is written in ``torch_tiles``). Three exist:

- ``"torch"``: readable PyTorch, any dtype (float64 included) and device;
- ``"cpu_flash"``: PyTorch's fused CPU flash kernel (the one place that touches a private op);
- ``"triton"``: fused Triton kernels for CUDA tensors (optional extra ``memattn[gpu]``; imported
  only when chosen, so triton stays optional).

A *decode kernel* attends one query per sequence to a paged KV cache read through its block table
(``paged_decode.py`` states the one signature they share). Three exist: ``"native"`` (a small C
kernel), ``"pool"`` (the fused CPU kernel run zero-copy over the block pool) and ``"triton"``.
A tile backend may name its own decode kernel (``Backend.paged_decode``); the paged schedule falls
back to gathering blocks into the tile primitive when no decode kernel applies.

Callers never test which module they hold: they ask the records (``choose``, ``choose_decode``)
and read capabilities off the chosen one. ``use_backend`` forces a backend by name, for tests and
benchmarks. When nothing fits, the error gives every backend's reason for refusing.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import cpu_flash, torch_tiles
from .torch_tiles import compute_dtype

ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The KV storage formats a decode kernel may read: full width, or a quantized format of
# ``memattn.cache.kv_formats`` (its name), declared by each kernel that reads it in place.
FULL_WIDTH = "full"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_tiles():
    """The Triton tile module (``memattn.kernels.triton``), imported on first use."""
    return importlib.import_module(".triton", __name__)


def _triton_refusal(q) -> str | None:
    if not triton_installed():
        return "needs triton: pip install 'memattn[gpu]'"
    if not triton_tiles().available(q):
        return "needs CUDA tensors (or CPU tensors but bfloat16 under TRITON_INTERPRET=1)"
    return None


def _cpu_flash_refusal(q) -> str | None:
    return None if cpu_flash.available(q) else "needs PyTorch's CPU flash op (torch >= 2.2)"


def _native_refusal(q) -> str | None:
    from . import native
    return None if native.available() else "the C kernel could not be built here (no compiler, or MEMATTN_NATIVE=0)"


@dataclass(frozen=True)
class DecodeKernel:
    """A paged-decode kernel: one query per sequence, keys read through the block table.

    dtypes: query / cache dtypes it reads. devices: ``torch.device.type`` values.
    kv_formats: KV storage formats it reads in place. alibi, softcap, sinks: score modifiers it
    applies (sinks: one learnable logit per head in the softmax denominator). max_ranges: visible
    key ranges per sequence it takes (1: one window; 2: the first sink tokens plus a recent window).
    load: returns the kernel's function, which follows ``paged_decode``'s contract (imported on
    first use). probe: a reason it cannot run
    here (beyond dtype and device), or None.
    """

    name: str
    dtypes: tuple
    devices: tuple
    load: Callable[[], Callable]
    kv_formats: tuple = (FULL_WIDTH,)
    alibi: bool = False
    softcap: bool = False
    sinks: bool = False
    max_ranges: int = 1
    probe: Callable[[torch.Tensor], str | None] = lambda q: None

    def refusal(self, q, cache_dtype, *, alibi=False, softcap=0.0, sinks=False, ranges=1,
                kv_format=FULL_WIDTH) -> str | None:
        """Why this kernel cannot run the call, or None if it can."""
        if q.device.type not in self.devices:
            return f"device {q.device.type} not in {list(self.devices)}"
        if q.dtype not in self.dtypes or (kv_format == FULL_WIDTH and cache_dtype != q.dtype):
            return f"dtype {q.dtype} (cache {cache_dtype}) not supported"
        for wanted, has, what in ((kv_format not in self.kv_formats, False, f"KV format {kv_format!r}"),
                                  (alibi, self.alibi, "ALiBi"), (bool(softcap), self.softcap, "softcap"),
                                  (sinks, self.sinks, "sink logits"),
                                  (ranges > self.max_ranges, False, f"{ranges} visible key ranges")):
            if wanted and not has:
                return f"no {what}"
        return self.probe(q)


@dataclass(frozen=True)
class Backend:
    """A tile backend: ``tile_forward`` / ``tile_backward`` with ``torch_tiles``' contract.

    dtypes, devices: what it computes on (no devices: any). fused: one kernel per tile (no score tile in memory),
    so query blocks may be large. softcap, sinks: score modifiers it applies. dlse: its backward
    takes an lse gradient (folded into ``delta``). derives_delta: its backward computes
    ``delta = rowsum(dO * O)`` itself from ``out`` (pass delta=None). large_tiles: its cost is
    per call, so runs of adjacent full tiles go to it as one call however long, and distributed
    schedules give it large query blocks. default_block: tile edge when nobody sets one.
    window_block: (divisor, min, max): under a sliding window of W keys per row the tile edge is
    the power of two near W / divisor, clamped to [min, max] (edge tiles then waste little).
    paged_decode: its own decode kernel, or None. load: returns the tile module.
    """

    name: str
    dtypes: tuple
    devices: tuple
    load: Callable[[], object]
    fused: bool
    default_block: int
    window_block: tuple
    softcap: bool = False
    sinks: bool = False
    dlse: bool = True
    derives_delta: bool = False
    large_tiles: bool = False
    paged_decode: DecodeKernel | None = None
    probe: Callable[[torch.Tensor], str | None] = lambda q: None

    @property
    def tiles(self):
        """The module with ``tile_forward`` and ``tile_backward``."""
        return self.load()

    def refusal(self, q, *, softcap=0.0, dlse=False, sinks=False) -> str | None:
        """Why this backend cannot run the call, or None if it can."""
        if self.devices and q.device.type not in self.devices:
            return f"device {q.device.type} not in {list(self.devices)}"
        if q.dtype not in self.dtypes:
            return f"dtype {q.dtype} not in {[str(d).replace('torch.', '') for d in self.dtypes]}"
        if softcap and not self.softcap:
            return "no softcap"
        if sinks and not self.sinks:
            return "no sink logits"
        if dlse and not self.dlse:
            return "its backward derives delta itself and cannot add an lse gradient"
        return self.probe(q)


def _triton_decode():
    return triton_tiles().paged_decode


def _pool_decode():
    from . import paged_pool
    return paged_pool.decode


def _native_decode():
    from . import paged_native
    return paged_native.decode


NATIVE_DECODE = DecodeKernel("native", (torch.float32, torch.bfloat16, torch.float16), ("cpu",), _native_decode,
                             kv_formats=(FULL_WIDTH, "int8", "fp8_e4m3", "int4", "int2"), alibi=True, softcap=True,
                             probe=_native_refusal)
POOL_DECODE = DecodeKernel("pool", ALL_FLOATS, ("cpu",), _pool_decode, probe=_cpu_flash_refusal)
TRITON_DECODE = DecodeKernel("triton", (torch.float16, torch.bfloat16, torch.float32), ("cuda", "cpu"),
                             _triton_decode, alibi=True, softcap=True, probe=_triton_refusal)

# In order of preference: the first that accepts a call runs it.
BACKENDS = (
    Backend("triton", (torch.float16, torch.bfloat16, torch.float32), ("cuda", "cpu"), triton_tiles, fused=True,
            default_block=1024, window_block=(2, 128, 1024), softcap=True, paged_decode=TRITON_DECODE,
            probe=_triton_refusal),
    Backend("cpu_flash", ALL_FLOATS, ("cpu",), lambda: cpu_flash, fused=True, default_block=1024,
            window_block=(8, 32, 256), dlse=False, derives_delta=True, large_tiles=True, paged_decode=POOL_DECODE,
            probe=_cpu_flash_refusal),
    # Materialises a block_q x block_k score tile per head, so its tiles stay small.
    Backend("torch", ALL_FLOATS, (), lambda: torch_tiles, fused=False,
            default_block=256, window_block=(8, 32, 256), softcap=True),
)
# Decode kernels not owned by a tile backend, tried before the chosen backend's own.
DECODE_KERNELS = (NATIVE_DECODE,)
NAMES = tuple(b.name for b in BACKENDS)
DECODE_NAMES = ("native", "pool", "triton", "gather")
# Triton on CPU tensors runs under its (slow) interpreter: only when asked for by name.
_ONLY_BY_NAME = {("triton", "cpu")}

_forced: contextvars.ContextVar = contextvars.ContextVar("memattn_backend", default=(None, None))


def backend(name: str) -> Backend:
    """The record of tile backend `name`."""
    for b in BACKENDS:
        if b.name == name:
            return b
    raise ValueError(f"unknown tile backend {name!r}; choose from {list(NAMES)}")


def _decode_kernel(name: str) -> DecodeKernel | None:
    for k in (*DECODE_KERNELS, *(b.paged_decode for b in BACKENDS if b.paged_decode)):
        if k.name == name:
            return k
    if name == "gather":
        return None
    raise ValueError(f"unknown decode kernel {name!r}; choose from {list(DECODE_NAMES)}")


@contextlib.contextmanager
def use_backend(tile: str | None = None, *, decode: str | None = None):
    """Force a tile backend and/or a paged-decode kernel by name inside the block (thread- and
    task-local, like ``torch.nn.attention.sdpa_kernel``)::

        with memattn.kernels.use_backend("torch"):            # the readable tile everywhere
            memattn.attention(q, k, v)
        with memattn.kernels.use_backend(decode="gather"):    # paged decode through the tile primitive

    A call the forced choice cannot run raises ``ValueError`` with the reason. decode: "native",
    "pool", "triton" or "gather" (no decode kernel: blocks gathered into the tile primitive).
    """
    if tile is not None:
        backend(tile)
    if decode is not None:
        _decode_kernel(decode)
    token = _forced.set((tile, decode))
    try:
        yield
    finally:
        _forced.reset(token)


def forced() -> tuple:
    """(tile backend name, decode kernel name) forced by ``use_backend`` here, None where not."""
    return _forced.get()


def choose(q, *, softcap: float = 0.0, dlse: bool = False, sinks: bool = False, impl: str | None = None,
           honour_forced: bool = True) -> Backend:
    """The backend to run q with: `impl` (or the ``use_backend`` choice) if given, else the first
    record that accepts the call. dlse: the backward needs an lse gradient. Raises ValueError
    naming every backend's reason when none fits."""
    name = impl if impl is not None else (forced()[0] if honour_forced else None)
    wants = dict(softcap=softcap, dlse=dlse, sinks=sinks)
    if name is not None:
        b = backend(name)
        why = b.refusal(q, **wants)
        if why:
            raise ValueError(f"the {name} tile backend cannot run this call ({q.device.type} {q.dtype}): {why}")
        return b
    reasons = []
    for b in BACKENDS:
        why = "runs CPU tensors only under its interpreter, when asked for by name" \
            if (b.name, q.device.type) in _ONLY_BY_NAME else b.refusal(q, **wants)
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    raise ValueError(f"no tile backend fits {q.device.type} {q.dtype} with {wants}: " + "; ".join(reasons))


def choose_decode(q, cache_dtype, tile: Backend, **features) -> DecodeKernel | None:
    """The decode kernel for a paged decode step, or None for the gather schedule over `tile`.

    Tried in order: the ``use_backend(decode=...)`` choice if any (a ValueError if it cannot run
    the call), the kernels that belong to no tile backend, then `tile`'s own. features: alibi,
    softcap, sinks, ranges, kv_format (see ``DecodeKernel.refusal``)."""
    name = forced()[1]
    if name is not None:
        k = _decode_kernel(name)
        why = k.refusal(q, cache_dtype, **features) if k is not None else None
        if why:
            raise ValueError(f"the {name} decode kernel cannot run this call ({q.device.type} {q.dtype}): {why}")
        return k
    for k in (*DECODE_KERNELS, tile.paged_decode):
        if k is not None and k.refusal(q, cache_dtype, **features) is None:
            return k
    return None


def select(q, *, softcap: float = 0.0, impl: str | None = None):
    """The tile module ``choose`` picks (kept for callers of the module-returning API)."""
    return choose(q, softcap=softcap, impl=impl).tiles


def name_of(tiles) -> str:
    """The backend name of a tile module (``"torch"``, ``"cpu_flash"`` or ``"triton"``)."""
    for b in BACKENDS:
        if b.name != "triton" and b.tiles is tiles:
            return b.name
    return "triton"


IMPLS = {"torch": torch_tiles, "cpu_flash": cpu_flash}

__all__ = ["Backend", "DecodeKernel", "BACKENDS", "DECODE_KERNELS", "NAMES", "backend", "choose", "choose_decode",
           "use_backend", "forced", "select", "compute_dtype", "torch_tiles", "cpu_flash", "IMPLS", "name_of",
           "triton_installed", "triton_tiles", "FULL_WIDTH"]
