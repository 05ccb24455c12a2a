"""Cases run in a persistent worker process, started with the ``spawn`` context (a fork after OpenMP
has started its threads can hang). A case that kills the worker (segfault, SIGFPE, abort) or runs past
its timeout is recorded as a CRASH with its example; the next case gets a fresh worker."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import traceback

from .contract import CRASH, UNCLEAR

CASE_TIMEOUT_S = float(os.environ.get("MEMATTN_FUZZ_CASE_TIMEOUT", "120"))


def _serve(conn, tests_dir):
    """The worker's loop: receive (entry name, case), send back (kind, message)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (as tests/conftest does)
    sys.path.insert(0, tests_dir)
    import torch
    torch.set_num_threads(1)
    from .entries import ENTRIES
    from .contract import Failure, OK
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, case = msg
        try:
            ENTRIES[name].check(case)
            result = (OK, "")
        except Failure as f:
            result = (f.kind, str(f))
        except BaseException as e:  # noqa: BLE001 -- a check that failed itself is reported, never swallowed
            result = (UNCLEAR, f"check raised {type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}")
        conn.send(result)


class Worker:
    """One spawned worker at a time; ``run`` restarts it after a crash."""

    def __init__(self):
        self._ctx = mp.get_context("spawn")
        self._proc = self._conn = None
        self.restarts = 0

    def _start(self):
        parent, child = self._ctx.Pipe()
        tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._proc = self._ctx.Process(target=_serve, args=(child, tests_dir), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def run(self, name: str, case: dict, timeout: float = CASE_TIMEOUT_S) -> tuple[str, str]:
        """(kind, message) of one case; CRASH if the worker died or hung on it."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send((name, case))
            if self._conn.poll(timeout):
                return self._conn.recv()
            why = f"hung for more than {timeout:.0f} s"
        except (EOFError, BrokenPipeError, ConnectionResetError):
            why = None
        self._proc.join(1)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        code = self._proc.exitcode
        self._proc = None
        self.restarts += 1
        if why is None:
            why = f"worker died with exit code {code}" + (f" (signal {-code})" if code is not None and code < 0 else "")
        return CRASH, why

    def close(self):
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
        self._proc = None
