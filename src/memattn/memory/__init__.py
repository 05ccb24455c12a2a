"""Memory: analytic estimates (``estimate``) and real measured peaks (``measure``)."""
from .estimate import estimate
from .measure import Measurement, available_bytes, measure, measure_call

__all__ = ["estimate", "measure", "measure_call", "Measurement", "available_bytes"]
