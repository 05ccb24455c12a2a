"""The fuzzer's quick profile (issue 15): every entry point of ``tests/fuzz/entries.py``, a few dozen hypothesis
cases each, run in one spawned worker process (a crash kills only the worker and fails its entry with the
falsifying example). ``make fuzz`` runs the long profile (``python -m fuzz.runner``, >= 500 cases per entry).

Marked ``fuzz``: ``pytest -m "not fuzz"`` leaves it out; plain ``pytest`` / ``make test`` runs it.
"""
from __future__ import annotations

import zlib

import pytest

pytest.importorskip("hypothesis")

from fuzz.entries import ENTRIES  # noqa: E402
from fuzz.runner import failures_text, run_entry  # noqa: E402
from fuzz.worker import Worker  # noqa: E402

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("name", list(ENTRIES))
def test_fuzz_quick(worker, name):
    entry = ENTRIES[name]
    r = run_entry(worker, entry, entry.quick, seed=zlib.crc32(name.encode()))
    assert r["cases"] > 0
    assert not (r["crash"] or r["wrong"] or r["unclear"]), (
        f"{name}: {r['crash']} crashes, {r['wrong']} wrong, {r['unclear']} unclear of {r['cases']}\n"
        + failures_text(r))
