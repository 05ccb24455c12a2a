"""Ring communication on torch.distributed, with bounded waits and errors that say who failed.

Every wait here is bounded by the process group's timeout (set it with ``init_process_group``):
gloo applies it to each send/receive and collective, so a dead or stuck peer turns into a
``RingError`` on every other rank instead of a hang.
"""
from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .._validate import FLOAT_DTYPES


class RingError(RuntimeError):
    """A peer rank failed, timed out, or disagreed with this rank about the call."""


def init_process_group(backend: str | None = None, *, timeout_s: float = 60.0, init_method: str | None = None,
                       rank: int | None = None, world_size: int | None = None) -> None:
    """``torch.distributed.init_process_group`` with a bounded timeout for set-up and every later wait.

    backend: default "nccl" when CUDA is available, else "gloo". Under torchrun leave init_method,
    rank and world_size as None (they come from the environment).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    kwargs = {k: val for k, val in (("init_method", init_method), ("rank", rank), ("world_size", world_size))
              if val is not None}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def group_info(group) -> tuple[int, int]:
    """(rank in group, group size); raises a clear error when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call memattn.distributed.init_process_group() "
                           "(or torch.distributed.init_process_group) first, e.g. under torchrun")
    return dist.get_rank(group), dist.get_world_size(group)


def _wait(work, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as e:  # gloo raises RuntimeError on timeouts and closed connections
        raise RingError(f"{what} failed: {e}. A peer rank probably failed or is stuck; every rank must "
                        "make the same sequence of ring calls.") from e


def agree(group, fields: dict[str, int], error: str | None, what: str) -> None:
    """Check that every rank of `group` passes equal `fields` (small ints) and no local `error`.

    One all-gather of int64s; it raises ``RingError`` on every rank, naming the disagreeing ranks,
    so a bad call on one rank cannot leave the others waiting forever.
    """
    rank, _ = group_info(group)
    mine = torch.tensor([0 if error is None else 1, *fields.values()], dtype=torch.int64)
    rows = [g.tolist() for g in all_gather(mine, group, f"rank {rank}: {what}: checking the call across ranks")]
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        detail = error if error is not None else "see that rank's error"
        raise RingError(f"{what}: rank(s) {failed} rejected their inputs ({detail})")
    names = list(fields)
    for i, name in enumerate(names, start=1):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {val}" for r, val in enumerate(values))
            raise RingError(f"{what}: ranks disagree on {name} ({per_rank}); every rank must pass equal "
                            "shards and the same options")


def all_gather(x: torch.Tensor, group, what: str) -> list[torch.Tensor]:
    """Every rank's `x` (all of one shape), as a list on x's device; the wait is bounded."""
    _, world = group_info(group)
    device = _comm_device(group)
    parts = [torch.empty(x.shape, dtype=x.dtype, device=device) for _ in range(world)]
    _wait(dist.all_gather(parts, x.contiguous().to(device), group=group, async_op=True), what)
    return [p.to(x.device) for p in parts]


def dtype_code(dtype: torch.dtype) -> int:
    return FLOAT_DTYPES.index(dtype) if dtype in FLOAT_DTYPES else -1


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class WaitClock:
    """Seconds this process spends blocked in the ring's point-to-point waits while the clock runs.

    For benchmarks that split a ring call's wall time into compute and communication::

        with WaitClock() as clock:
            ring_attention(q, k, v, group=g)
        compute_s = wall_s - clock.seconds

    Clocks may nest; while none runs, a wait costs one list check more. Not counted: the argument
    check's all-gather at the start of a call.
    """

    _running: list[WaitClock] = []

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self) -> WaitClock:
        WaitClock._running.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        WaitClock._running.remove(self)
        return False


class _Pending:
    """Tensors in flight: ``wait()`` returns the received ones once the matching sends are done too."""

    def __init__(self, works, received, what):
        self.works, self.received, self.what = works, received, what

    def wait(self):
        t0 = time.perf_counter() if WaitClock._running else None
        try:
            for w in self.works:
                _wait(w, self.what)
        finally:
            if t0 is not None:
                waited = time.perf_counter() - t0
                for clock in WaitClock._running:
                    clock.seconds += waited
        self.works = []
        return self.received


class RingComm:
    """Point-to-point ring: each rank sends to rank + 1 and receives from rank - 1 (within `group`)."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = group_info(group)
        as_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = as_global((self.rank + 1) % self.world)
        self.prev = as_global((self.rank - 1) % self.world)

    def exchange(self, sends, recvs, what: str) -> _Pending:
        """Post, as one batch, sends to the next rank and receives from the previous one.

        sends: [(tag, tensor)], contiguous tensors that must stay unmodified until ``wait()``.
        recvs: [(tag, template)]: a tensor of that shape and dtype is allocated for each and
        ``wait()`` returns them in this order. Gloo matches a tag's messages in the order they were
        posted; NCCL ignores tags and matches all of a pair's messages in order, so post receives
        in the order the previous rank posts its sends.
        """
        if self.world == 1:
            return _Pending([], tuple(torch.empty_like(t) for _, t in recvs), what)
        received = tuple(torch.empty_like(t) for _, t in recvs)
        ops = [dist.P2POp(dist.irecv, r, self.prev, self.group, tag) for (tag, _), r in zip(recvs, received)]
        ops += [dist.P2POp(dist.isend, t, self.next, self.group, tag) for tag, t in sends]
        # One batch: NCCL progresses a batch's sends and receives together, so a ring whose every
        # rank sends before it receives cannot deadlock (also when previous == next, P = 2).
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Pending(works, received, f"rank {self.rank}: {what} (from rank {self.prev}, to rank {self.next})")

    def send_recv(self, tensors, tag: int, what: str) -> _Pending:
        """Start sending `tensors` to the next rank and receiving same-shaped ones from the previous
        (tensor i under tag + i, so they are never matched out of order)."""
        if self.world == 1:
            return _Pending([], tuple(tensors), what)
        return self.exchange([(tag + i, t) for i, t in enumerate(tensors)],
                             [(tag + i, t) for i, t in enumerate(tensors)], what)

    def rotate(self, tensors, tag: int, what: str):
        """Yield (step, source rank, tensors) for step 0..P-1: this rank's own tensors, then those of
        rank - 1, rank - 2, ... The next block is already in flight while the caller computes."""
        current = tuple(tensors)
        for step in range(self.world):
            pending = (self.send_recv(current, tag, f"{what}, step {step}") if step + 1 < self.world else None)
            yield step, (self.rank - step) % self.world, current
            if pending is not None:
                current = pending.wait()
