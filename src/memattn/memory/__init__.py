"""Memory: analytic estimates (``estimate``) and real measured peaks (``measure``; ``measure_process`` for
whole-process workloads, by the resident-memory high-water mark) and the machine's read bandwidth
(``read_bandwidth``, the ceiling of a batch-1 decode step)."""
from .bandwidth import decode_ceiling, read_bandwidth, weight_bytes
from .estimate import estimate
from .measure import Measurement, available_bytes, measure, measure_call
from .process import measure_process, release_freed_memory

__all__ = ["estimate", "measure", "measure_call", "measure_process", "Measurement", "available_bytes",
           "read_bandwidth", "weight_bytes", "decode_ceiling", "release_freed_memory"]
