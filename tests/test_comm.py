"""memattn.distributed.comm: the WaitClock hook (no process group needed: a stand-in for gloo's work)."""
from __future__ import annotations

import time

from memattn.distributed.comm import WaitClock, _Pending


class _SlowWork:
    """Stands in for a gloo Work: wait() blocks for `seconds`."""

    def __init__(self, seconds):
        self.seconds = seconds

    def wait(self):
        time.sleep(self.seconds)


def test_wait_clock_counts_only_waits_inside_it():
    received = ("tensor",)
    _Pending([_SlowWork(0.02)], received, "outside").wait()  # before any clock: counted nowhere
    t0 = time.perf_counter()
    with WaitClock() as outer:
        with WaitClock() as inner:
            assert _Pending([_SlowWork(0.05)], received, "inner").wait() == received
        t1 = time.perf_counter()
        time.sleep(0.03)  # not a wait: not counted
        slept = time.perf_counter() - t1
        _Pending([_SlowWork(0.02)], received, "outer").wait()
    wall = time.perf_counter() - t0
    assert inner.seconds >= 0.05
    assert outer.seconds >= inner.seconds + 0.02  # both waits
    assert outer.seconds <= wall - slept  # not the sleep between them
    assert WaitClock._running == []
