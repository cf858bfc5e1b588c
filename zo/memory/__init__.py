"""Memory: what a step uses (measured) and what it will use (planned).

- :mod:`zo.memory.measure` -- peak RSS / allocator peaks, ``format_bytes``
- :mod:`zo.memory.estimator` -- ``EstimatorMemory``, the trait each estimator registers
- :mod:`zo.memory.shapes` -- a model's shape, derived from its Hugging Face config
- :mod:`zo.memory.step` -- the planner: the peak of one training step, per component
- :mod:`zo.memory.search` -- the configurations that fit a memory budget
- :mod:`zo.memory.report` -- plans and searches as tables and JSON
"""

from zo.memory.estimator import EstimatorMemory, PlannedEstimator
from zo.memory.measure import (
    CallCost,
    current_rss_bytes,
    format_bytes,
    measure_call,
    peak_memory_bytes,
    peak_rss_bytes,
    peak_rss_since_reset_bytes,
    reset_peak_memory,
    return_large_frees_to_os,
    time_call,
)

__all__ = [
    "CallCost",
    "EstimatorMemory",
    "PlannedEstimator",
    "current_rss_bytes",
    "format_bytes",
    "measure_call",
    "peak_memory_bytes",
    "peak_rss_bytes",
    "peak_rss_since_reset_bytes",
    "reset_peak_memory",
    "return_large_frees_to_os",
    "time_call",
]
