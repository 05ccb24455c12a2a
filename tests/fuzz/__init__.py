"""A property-based fuzzer over every public entry point of memattn (issue 15).

- ``contract``: what one case must satisfy (a clear ValueError/TypeError naming the argument, or the float64
  reference under FlashAttention's rule, NaN/inf patterns included) and how a failure is classified;
- ``worker``: the spawned worker process the cases run in (a segfault kills only the worker);
- ``entries``: the table of entry points, each a hypothesis strategy of plain-data cases plus its check;
- ``runner``: the two profiles (``quick`` under pytest in tests/test_fuzz.py, ``long`` for ``make fuzz``).

Cases are plain dicts (sizes, dtype names, seeds, where hostile values go): picklable, printable, and rebuilt
to tensors inside the worker, so every failure prints a falsifying example that reproduces with
``python -m fuzz.runner --replay ENTRY 'CASE'`` from tests/.
"""
