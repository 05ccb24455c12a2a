"""Small C kernels built on first use with the system C compiler and called through ctypes.

Why C and not a torch extension: the kernels here (``csrc/paged_decode.c``, paged decode; ``csrc/gemv.c``,
the few-row matrix-vector products of batch-1 decode; ``csrc/decode_step.c``, a whole Llama decode step built
from those two; ``csrc/native.h``, what they share) need no torch or Python headers, so it builds in about a second with ``cc`` and loads with ctypes; a
torch C++ extension would need ninja and a minute of compiling against torch's headers.

The shared library is cached under ``$MEMATTN_CACHE_DIR`` (default ``~/.cache/memattn``) in a folder
named by a hash of the source, the flags and this CPU's feature flags (the build uses
``-march=native``), and written atomically, so concurrent processes and machines sharing a home folder
are safe. Without a compiler, or with ``MEMATTN_NATIVE=0``, ``library()`` returns None once with a
warning, and callers keep their pure-torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("pool.c", "paged_decode.c", "gemv.c", "decode_step.c")]
_HEADERS = [_CSRC / "native.h"]
# -ffp-contract=fast: fused multiply-adds (one rounding instead of two)
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared", "-pthread", "-std=c11",
          "-lm"]
_lib = None
_tried = False


def cpu_flags() -> str:
    """The CPU's feature flags line from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("MEMATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memattn")
    return Path(root)


def _build(cc: str) -> Path:
    src = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    key = hashlib.sha256(src + " ".join([cc, *_FLAGS, platform.machine(), cpu_flags()]).encode()).hexdigest()[:16]
    for root in (_cache_dir(), Path(tempfile.gettempdir()) / f"memattn-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        target = root / f"native-{key}" / "memattn_native.so"
        if target.exists():
            return target
        try:  # a read-only home folder: build under the temp folder instead
            target.parent.mkdir(parents=True, exist_ok=True)
            break
        except OSError:
            continue
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *map(str, _SOURCES), "-I", str(_CSRC), "-o", tmp, *_FLAGS], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)  # atomic: another process may be building the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library():
    """The loaded ctypes library, or None when it cannot be built here (warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("MEMATTN_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        warnings.warn("memattn: no C compiler found; paged decode uses its pure-torch path", RuntimeWarning)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"memattn: building the native paged decode kernel failed ({detail.strip()[:500]}); "
                      "using the pure-torch path", RuntimeWarning)
        return None
    f = lib.paged_decode
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    f.argtypes = [i32, p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, f32, f32, p, i64, i64, p, p, i32]
    f.restype = ctypes.c_int
    f = lib.paged_decode_quant
    f.argtypes = [i32, p, p, p, p, p, p, p, p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, f32, f32, p, i64, i64,
                  p, p, i32]
    f.restype = ctypes.c_int
    f = lib.gemv
    f.argtypes = [i32, i32, p, i64, p, i64, i64, p, p, i32]
    f.restype = ctypes.c_int
    f = lib.add_rms_norm
    f.argtypes = [i32, p, p, p, p, i64, i64, f32]
    f.restype = ctypes.c_int
    f = lib.silu_mul
    f.argtypes = [i32, p, p, i64, i64]
    f.restype = ctypes.c_int
    f = lib.llama_decode_step
    f.argtypes = [i32, i64, i64, i64, i64, i64, i64, i64, p, f32, p, p, p, p, p, i64, i64, p, i64, p, f32, i64, i64,
                  p, p, i64, p, i32]
    f.restype = ctypes.c_int
    lib.decode_step_layer_fields.restype = ctypes.c_int
    _lib = lib
    return _lib


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call)."""
    return library() is not None
