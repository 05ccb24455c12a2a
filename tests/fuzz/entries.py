"""The table of fuzzed entry points: name -> ``Entry(cases, check)``.

``cases`` is a hypothesis strategy of plain-data cases (dicts), ``check(case)`` runs the case in the worker
and raises ``contract.Failure`` on a violation. Adding an entry point (or a variant of one: a decode kernel, a
KV storage format, a score option) is one row here; see the module docstrings of ``dense`` and ``others``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from hypothesis import strategies as st

from . import dense, others


@dataclass(frozen=True)
class Entry:
    name: str
    cases: st.SearchStrategy
    check: Callable[[dict], None]
    quick: int = 25       # examples in the quick profile (make test)
    long: int = 500       # examples in the long profile (make fuzz)


def _dense(name, method, backend=None, dtypes=tuple(dense.DTYPES), quick=25, long=500, block_sizes=None):
    call = dense.attention_call(method, backend)
    materialised = method in ("standard", "checkpoint")  # scores stored in q's dtype
    return Entry(name, dense.attention_cases(dtypes=dtypes, block_sizes=block_sizes),
                 lambda case: dense.run_attention(case, call, materialised), quick=quick, long=long)


ROWS = [
    _dense("attention[auto]", "auto", quick=50),
    _dense("attention[standard]", "standard"),
    _dense("attention[checkpoint]", "checkpoint"),
    _dense("attention[blockwise]", "blockwise", quick=50),
    _dense("attention[blockwise/torch]", "blockwise", backend="torch"),
    # Triton under its interpreter (CPU): slow per case, so its cases stay few in the quick profile; no
    # bfloat16 there (numpy has none: refused, see kernels/triton/tiles.available)
    # (and tiles of 16 or more: 1-row tiles of 70 x 70 take minutes there)
    _dense("attention[blockwise/triton]", "blockwise", backend="triton", dtypes=("float16", "float32"), quick=4,
           block_sizes=[None, None, 16, 64]),
    *others.ROWS(Entry),
]
ENTRIES = {e.name: e for e in ROWS}
