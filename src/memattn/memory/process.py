"""Measure a call's peak by the process's resident memory (RSS) high-water mark: the "process" mode.

For whole-process workloads (a serving loop, a model load) where the profiler behind ``measure`` is
too slow: it records every allocation, and a loop of many small ops runs several times slower under it.
This mode costs nothing during the call: it reads the kernel's counters before and after.

What it sees: every page the process touches while the call runs, above the resident size at its start:
PyTorch tensors, BLAS/oneDNN workspace, Python objects, other threads', memory-mapped files read in. Page
granular, and only pages actually touched (a reserved, never written pool does not count). Not seen:
memory the allocator keeps from before the call and reuses (it is already resident), so measure in a
fresh process when the figure matters.

How, in order of preference:
- Linux: write 5 to ``/proc/self/clear_refs`` (resets the high-water mark, VmHWM, to the current RSS),
  run the call, read VmHWM from ``/proc/self/status``; peak = VmHWM - VmRSS at the start. Exact.
- Linux where the reset is refused (some sandboxes): VmHWM is then the process's peak since it started,
  so the figure is exact only when the call sets a new high for the process, and an over-estimate
  otherwise (an earlier, larger peak shows through).
- Elsewhere (no ``/proc``): ``resource.getrusage`` ``ru_maxrss``, which cannot be reset either, and no
  current RSS to start from: peak = growth of ru_maxrss during the call, exact when the call sets a new
  high, else an under-estimate. In a fresh worker process whose measured call is its largest (serve.py's
  design), both fallbacks are exact.
``Measurement.method`` says which counter was used.
"""
from __future__ import annotations

import functools

import sys

from .measure import Measurement


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes, or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None without glibc (looked up once)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``); True if it ran.

    glibc serves allocations below its mmap threshold (which rises to 32 MiB after the first large free) from
    its heap and keeps the pages of freed blocks resident: a training step's transient per-layer tensors
    (tens of MiB each at long context) leave holes between the tensors kept for backward, and the process's
    resident memory follows the heap's high-water mark rather than its live tensors. ``malloc_trim(0)``
    returns every whole free page, holes included (madvise). Best effort: a no-op without glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _trim_heap() -> None:
    """Before a measurement: without it a call can reuse pages that earlier, freed allocations left resident,
    and its peak would not show in the RSS (a test run after a model load saw 0 bytes for a 32 MiB buffer)."""
    release_freed_memory()


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    import resource  # Unix only; imported here so the module imports everywhere
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux and the BSDs
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_process(fn, *args, **kwargs) -> Measurement:
    """Run ``fn(*args, **kwargs)`` once; its result and the process's RSS peak above the start (see the module).

    Raises OSError where neither /proc nor ``resource`` is available (Windows).
    """
    _trim_heap()
    reset = _reset_high_water_mark()
    start = _status_bytes("VmRSS")
    if start is not None and _status_bytes("VmHWM") is not None:
        method = "VmHWM" if reset else "VmHWM (not reset)"
        read = lambda: _status_bytes("VmHWM")  # noqa: E731
    else:
        try:
            start = _max_rss_bytes()
        except ImportError as e:
            raise OSError("no process memory counter on this platform (neither /proc nor resource)") from e
        method, read = "ru_maxrss (not reset)", _max_rss_bytes
    result = fn(*args, **kwargs)
    return Measurement(result, max(0, read() - start), method)
