"""The main job: the textbook memory table, measured on this machine.

For every method and sequence length: measured peak memory (``memory.measure``), the analytic
estimate (``memory.estimate``), median time, and max error against a float64 reference. With
``backward=True`` each measurement is a stack of ``layers`` attention calls (x -> attn(x, x, x))
plus one backward pass through all of them, so memory kept for the backward pass (which grows
with depth) shows apart from transient workspace.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import masks, reference
from .memory import available_bytes, estimate, measure_call
from .ops.dispatch import attention
from .ops.linear import linear_attention

WINDOW = 512  # keys per query for the sliding-window row (causal)
ERR_ROWS = 128  # the error is measured on the first and last ERR_ROWS query rows


@dataclass(frozen=True)
class CompareMethod:
    """A row family of the table. `run(q, k, v) -> out`; `oracle_mask(S)` is the mask the float64
    reference applies (None = plain softmax attention, which approximate methods are compared to)."""

    name: str
    run: Callable
    estimate_as: str
    oracle_mask: Callable = field(default=lambda s: None)
    description: str = ""


def _methods() -> dict[str, CompareMethod]:
    ms = [
        CompareMethod("standard", lambda q, k, v: attention(q, k, v, method="standard"), "standard",
                      description="materialised S x S scores"),
        CompareMethod("checkpoint", lambda q, k, v: attention(q, k, v, method="checkpoint"), "checkpoint",
                      description="standard, probabilities recomputed in backward"),
        CompareMethod("blockwise", lambda q, k, v: attention(q, k, v, method="blockwise"), "blockwise",
                      description="tiled online softmax, O(S) memory"),
        CompareMethod("window", lambda q, k, v: attention(q, k, v, causal=True, window_size=(WINDOW - 1, 0),
                                                          method="blockwise"), "window",
                      oracle_mask=lambda s: masks.sliding_window(WINDOW - 1, 0),
                      description=f"causal sliding window of {WINDOW} keys, empty tiles skipped"),
        CompareMethod("linear", lambda q, k, v: linear_attention(q, k, v, feature_map="elu"), "linear",
                      description="elu+1 linear attention (approximate: error vs softmax)"),
    ]
    return {m.name: m for m in ms}


METHODS = _methods()


@dataclass
class Record:
    method: str
    seq_len: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    backward: bool
    layers: int
    peak_mib: float | None
    est_mib: float
    time_s: float | None
    max_err: float | None
    status: str


def _inputs(batch, seq_len, heads, head_dim, dtype, requires_grad, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq_len, heads, head_dim, generator=g).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _workload(method: CompareMethod, q, k, v, backward: bool, layers: int):
    if not backward:
        return lambda: method.run(q, k, v)
    dout = torch.randn_like(q)

    def fwd_bwd():
        x = method.run(q, k, v)
        for _ in range(layers - 1):
            x = method.run(x, x, x)
        x.backward(dout)
        q.grad = k.grad = v.grad = None  # drop the grads so repeated runs start equal
    return fwd_bwd


def max_error(method: CompareMethod, q, k, v) -> float:
    """Max |out - ref64| of a method (see ``rows_error``)."""
    with torch.no_grad():
        return rows_error(method.run(q, k, v), q, k, v, method.oracle_mask(q.shape[1]))


def rows_error(out, q, k, v, mask=None, softmax_scale=None) -> float:
    """Max |out - ref64| over the first and last ERR_ROWS query rows, for square self-attention
    (Sq == Sk). The float64 reference of those rows against all keys costs O(rows x S), so it
    fits at any length. `mask`: a ``memattn.masks`` object the reference applies, or None."""
    s = q.shape[1]
    with torch.no_grad():
        out = out.double()
        err = 0.0
        for r0, r1 in {(0, min(ERR_ROWS, s)), (max(0, s - ERR_ROWS), s)}:
            m = None if mask is None else mask.element_mask(s, s, r0, r1, 0, s)
            # the rows r0..r1 of a bottom-right aligned square mask need the full-length offsets
            ref = reference.attention(q[:, r0:r1].double(), k.double(), v.double(), mask=m,
                                      softmax_scale=softmax_scale)
            err = max(err, (out[:, r0:r1] - ref).abs().max().item())
    return err


def run_compare(seq_lens, *, batch=1, heads=8, head_dim=64, dtype=torch.float32, backward=False, layers=4,
                methods=None, repeats=3, seed=0, progress=None) -> list[Record]:
    """Measure every (method, seq_len) pair; returns one Record each. `progress(record)` is
    called after each measurement."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    records = []
    for s in seq_lens:
        for name in methods:
            m = METHODS[name]
            est = estimate(m.estimate_as, batch, s, heads, head_dim, dtype, backward, layers if backward else 1)
            rec = Record(name, s, batch, heads, head_dim, str(dtype).replace("torch.", ""), backward,
                         layers if backward else 1, None, est / 2**20, None, None, "ok")
            budget = 0.8 * available_bytes()
            if est > budget:
                rec.status = f"skipped: needs {est / 2**30:.1f} GiB"
            else:
                q, k, v = _inputs(batch, s, heads, head_dim, dtype, backward, seed)
                work = _workload(m, q, k, v, backward, layers)
                rec.peak_mib = measure_call(work).peak_bytes / 2**20  # also the warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    work()
                    times.append(time.perf_counter() - t0)
                rec.time_s = statistics.median(times)
                rec.max_err = max_error(m, q.detach(), k.detach(), v.detach())
            records.append(rec)
            if progress:
                progress(rec)
    return records


def records_as_dicts(records):
    return [asdict(r) for r in records]


def format_bytes_mib(mib):
    if mib is None:
        return "-"
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"


def table_rows(records):
    """Rows of strings for the printed table."""
    rows = []
    for r in records:
        rows.append([r.method, str(r.seq_len), format_bytes_mib(r.peak_mib), format_bytes_mib(r.est_mib),
                     "-" if r.time_s is None else f"{r.time_s * 1e3:.1f} ms",
                     "-" if r.max_err is None else f"{r.max_err:.1e}", r.status])
    return rows


TABLE_HEADER = ["method", "seq_len", "peak (measured)", "estimate", "median time", "max err", "status"]


def plot(records, path):
    """Peak memory and time against sequence length, log axes, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r.method for r in records):
        rs = [r for r in records if r.method == name and r.peak_mib is not None]
        if not rs:
            continue
        xs = [r.seq_len for r in rs]
        ax_m.plot(xs, [r.peak_mib for r in rs], marker="o", label=name)
        ax_t.plot(xs, [r.time_s for r in rs], marker="o", label=name)
    r0 = records[0]
    what = f"{'forward+backward, ' + str(r0.layers) + ' layers' if r0.backward else 'forward'}"
    for ax, ylabel in ((ax_m, "peak memory (MiB, measured)"), (ax_t, "median time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"memattn compare: B={r0.batch} H={r0.heads} D={r0.head_dim} {r0.dtype}, {what}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
