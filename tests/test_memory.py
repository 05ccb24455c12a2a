"""memattn.memory: measured peaks and analytic estimates."""
from __future__ import annotations

import pytest
import torch

import memattn
from memattn.memory import estimate, measure, measure_call, measure_process


def test_measure_counts_allocations_inside_the_call():
    def alloc():
        a = torch.empty(1024, 1024)        # 4 MiB, alive until return
        b = torch.empty(2 * 1024, 1024)    # 8 MiB more: peak 12 MiB
        del b
        return a
    m = measure_call(alloc)
    assert 12 * 2**20 <= m.peak_bytes < 12 * 2**20 + 64 * 1024
    assert tuple(m.result.shape) == (1024, 1024)


def test_measure_sees_kernel_workspace():
    # a matmul's output is allocated inside ATen: the profiler sees it
    x = torch.randn(512, 512)
    assert measure(torch.mm, x, x) >= 512 * 512 * 4


def test_measure_ignores_what_existed_before():
    big = torch.randn(4 * 2**20)  # noqa: F841 - alive during the call, allocated before it
    assert measure(lambda: torch.empty(10)) < 2**20


def test_blockwise_backward_peak_is_below_a_tenth_of_standard():
    s = 8192
    g = torch.Generator().manual_seed(8192)
    q, k, v = (torch.randn(1, s, 2, 32, generator=g).requires_grad_(True) for _ in range(3))

    def run(method):
        def f():
            memattn.attention(q, k, v, method=method).sum().backward()
            q.grad = k.grad = v.grad = None
        return f
    blockwise, standard = measure(run("blockwise")), measure(run("standard"))
    assert standard > s * s * 2 * 4, "standard must hold at least one S x S float32 matrix per head"
    assert blockwise < 0.1 * standard, f"blockwise {blockwise / 2**20:.1f} MiB vs standard {standard / 2**20:.1f} MiB"


def test_process_mode_sees_a_touched_buffer():
    # 64 MiB written page by page inside the call: the RSS high-water mark must rise by most of it
    size = 64 * 2**20

    def touch():
        buf = torch.ones(size // 4)
        return float(buf[-1])
    m = measure_process(touch)
    assert m.result == 1.0
    assert m.peak_bytes >= 0.75 * size, f"{m.peak_bytes / 2**20:.1f} MiB seen of 64 MiB ({m.method})"
    assert m.peak_bytes < 4 * size  # no gross over-count (e.g. the whole process's RSS)


def test_process_mode_sees_memory_outside_torch():
    # a bytearray is Python memory, invisible to the profiler, visible in the RSS peak
    size = 32 * 2**20
    assert measure(lambda: len(bytearray(size))) < 2**20
    assert measure_process(lambda: len(bytearray(size))).peak_bytes >= 0.75 * size


def test_process_mode_is_relative_to_the_start():
    big = torch.ones(32 * 2**20)  # noqa: F841 - 128 MiB resident before the call
    m = measure_process(lambda: torch.ones(1024))
    if m.method == "VmHWM":  # reset: only the call's own pages count
        assert m.peak_bytes < 16 * 2**20


def test_estimate_orders_the_methods_like_the_textbook():
    args = dict(batch=1, seqlen=8192, heads=8, head_dim=64, dtype=torch.float32, backward=True, layers=4)
    std, ckpt, blk, lin = (estimate(m, **args) for m in ("standard", "checkpoint", "blockwise", "linear"))
    assert std > ckpt > blk and std > 30 * blk and blk > 0 and lin > 0
    # standard keeps one S^2 matrix set per layer; checkpointing keeps none
    assert estimate("standard", **{**args, "layers": 8}) > estimate("standard", **args) + 8192 ** 2 * 8 * 4
    assert estimate("checkpoint", **{**args, "layers": 8}) < estimate("checkpoint", **args) + 8192 ** 2 * 8 * 4


def test_estimate_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        estimate("magic", 1, 10, 1, 8)
    with pytest.raises(ValueError, match="seqlen must be > 0"):
        estimate("standard", 1, 0, 1, 8)


def test_read_bandwidth_and_weight_bytes():
    from memattn.memory import decode_ceiling, read_bandwidth, weight_bytes

    bw = read_bandwidth(8 << 20, repeats=1)
    assert bw > 0
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: counted once
    model = torch.nn.ModuleDict(dict(emb=emb, head=head, norm=torch.nn.LayerNorm(4)))
    assert weight_bytes(model) == (40 + 4 + 4) * 4
    assert decode_ceiling(model, 1.0) == 1e9 / weight_bytes(model)
    with pytest.raises(ValueError):
        read_bandwidth(0)
