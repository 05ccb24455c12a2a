"""Memory: analytic estimates (``estimate``) and real measured peaks (``measure``; ``measure_process`` for
whole-process workloads, by the resident-memory high-water mark)."""
from .estimate import estimate
from .measure import Measurement, available_bytes, measure, measure_call
from .process import measure_process

__all__ = ["estimate", "measure", "measure_call", "measure_process", "Measurement", "available_bytes"]
