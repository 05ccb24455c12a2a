"""Measure the real peak memory a call allocates.

How it measures:
- CPU tensors: PyTorch's profiler with ``profile_memory=True`` records every allocation and
  free made through PyTorch's CPU allocator, including those made inside ATen kernels (the
  fused flash kernel's scratch buffers, autograd's saved tensors). The running sum of those
  events, started at zero when the call begins, peaks at the figure returned. Resolution:
  one allocation (bytes). Not seen: memory that libraries allocate outside PyTorch's allocator
  (BLAS/oneDNN internal workspace, Python objects), and tensors alive before the call.
- CUDA tensors: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  what was allocated before the call.
- Whole processes (``measure_process``, in ``process.py``): the resident-memory high-water mark,
  for workloads the profiler would slow down too much.

This module is the one place that reads the profiler's memory events (through its private
``kineto_results``: the public ``events()`` API only reports each op's net allocation, which
misses the transient peak inside an op). Benchmarks and the CLI measure through it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C++-level stderr (the profiler prints a line on start and stop)."""
    try:
        fd = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


@dataclass(frozen=True)
class Measurement:
    """result: what fn returned; peak_bytes: peak bytes allocated during the call, above the start;
    method: the counter behind peak_bytes ("profiler", "cuda", or a process counter: see ``process.py``)."""

    result: object
    peak_bytes: int
    method: str = "profiler"

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def measure_call(fn, *args, device: str | torch.device = "cpu", **kwargs) -> Measurement:
    """Run ``fn(*args, **kwargs)`` once and return its result with the peak bytes it allocated."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_call(fn, args, kwargs, device)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        with _quiet_stderr():
            prof.stop()
    return Measurement(result, _running_peak(prof))


def _cuda_call(fn, args, kwargs, device) -> Measurement:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    return Measurement(result, torch.cuda.max_memory_allocated(device) - start, "cuda")


def _running_peak(prof) -> int:
    """Peak of the running sum of the profiler's allocator events (allocations +, frees -), from zero."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure(fn, *args, **kwargs) -> int:
    """Peak bytes allocated while running ``fn(*args, **kwargs)`` (see the module docstring)."""
    return measure_call(fn, *args, **kwargs).peak_bytes


def available_bytes() -> int:
    """Memory the OS says is available now (MemAvailable), or a conservative 4 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30
