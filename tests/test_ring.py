"""Ring attention on 2 and 4 gloo processes on 127.0.0.1.

Each spawn shares one process group across many cases (start-up dominates the cost). Every rank
compares its shard of out, lse, dq, dk, dv with attention on the full inputs (broadcast from
rank 0) under FlashAttention's rule (conftest.assert_fa_rule): max|ours - ref64| <= 2 * max|naive32 - ref64|
+ floor, factor 3 for gradients, the floor derived from the operands (conftest.attention_floors); float64 runs
are held to the float64 floor alone. Inputs come from the test's seed (conftest's `seed` fixture), one more
per case, and every failure message names its case's seed. Workers report through files, so a failing or
hanging rank shows up as a test failure with its traceback, never as a stuck test.
Each rank uses max(1, 2 // P) threads (the machine has 2 cores).
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import memattn.distributed as md
from conftest import assert_fa_rule, attention_floors
from memattn import reference
from memattn.distributed import ring as ring_module

SPAWN_DEADLINE_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, script: str, tmp_path: Path, seed: int, timeout_s: float = 60.0):
    """Run `script` (a name in SCRIPTS) on `world` ranks; fail with the ranks' tracebacks if any failed."""
    port = _free_port()
    ctx = mp.start_processes(_entry, args=(world, port, script, str(tmp_path), seed, timeout_s), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{script}: ranks still running after {SPAWN_DEADLINE_S}s")
    reports = {r: (tmp_path / f"{script}.{r}").read_text() if (tmp_path / f"{script}.{r}").exists() else "no report"
               for r in range(world)}
    failed = {r: t for r, t in reports.items() if t != "ok"}
    assert not failed, f"seed {seed}\n" + "\n".join(f"--- rank {r}:\n{t}" for r, t in failed.items())


_NEXT_SEED = [0]  # per worker process: the seed of the next case's inputs (every rank runs the same cases)


def _entry(rank, world, port, script, outdir, seed, timeout_s):
    torch.set_num_threads(max(1, 2 // world))
    _NEXT_SEED[0] = seed
    report = Path(outdir) / f"{script}.{rank}"
    try:
        md.init_process_group("gloo", timeout_s=timeout_s, init_method=f"tcp://127.0.0.1:{port}",
                              rank=rank, world_size=world)
        SCRIPTS[script](rank, world, report)
        report.write_text("ok")
    except BaseException:
        report.write_text(traceback.format_exc())
    os._exit(0)  # the report says how it went; tearing down a group whose peer died may itself crash


# ---------------------------------------------------------------- correctness


def _full_inputs(b, s, h, hkv, d, sk=None):
    """Seeded float64 inputs made on rank 0 and broadcast: the seed, q, k, v, dout, dlse (k, v of sk tokens)."""
    sk = s if sk is None else sk
    shapes = [(b, s, h, d), (b, sk, hkv, d), (b, sk, hkv, d), (b, s, h, d), (b, h, s)]
    seed = _NEXT_SEED[0]
    _NEXT_SEED[0] += 1
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, dtype=torch.float64, generator=gen) for shape in shapes]
    for t in tensors:
        dist.broadcast(t, 0)
    return [seed, *tensors]


def _reference(q, k, v, dout, dlse, causal, dtype):
    """out, lse, dq, dk, dv of materialised attention on the full sequence, computed in `dtype`."""
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    s = q.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    out, lse = reference.attention(q, k, v, mask=mask, return_lse=True)
    loss = (out * dout.to(dtype)).sum() + (lse * dlse.to(dtype)).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def _check_case(world, *, layout, causal, h, hkv, d, dtype=torch.float32, with_dlse=False, b=2, chunk=13,
                group=None, kv_chunk=None):
    ranks = world if group is None else dist.get_world_size(group)
    s = 2 * ranks * chunk
    seed, q, k, v, dout, dlse = _full_inputs(b, s, h, hkv, d, None if kv_chunk is None else 2 * ranks * kv_chunk)
    dlse = dlse if with_dlse else torch.zeros_like(dlse)
    floor = attention_floors(*(t.to(dtype) for t in (q, k, v, dout)), dlse.to(dtype))
    ref = _reference(q, k, v, dout, dlse, causal, torch.float64)
    naive = _reference(q, k, v, dout, dlse, causal, torch.float32)

    def sh(t):  # (B, H, S) lse is sharded along its last dim
        if t.dim() == 3:
            return md.shard(t.transpose(1, 2), group, layout=layout).transpose(1, 2)
        return md.shard(t, group, layout=layout)

    ql, kl, vl = (sh(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = md.ring_attention(ql, kl, vl, group=group, causal=causal, layout=layout, return_lse=True)
    loss = (out * sh(dout).to(dtype)).sum() + ((lse * sh(dlse).to(lse.dtype)).sum() if with_dlse else 0)
    grads = torch.autograd.grad(loss, (ql, kl, vl))
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    what = f"layout={layout} causal={causal} h={h} hkv={hkv} d={d} {dtype} dlse={with_dlse}"
    for name, ours, r64, rn, factor in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref, naive,
                                           (2, 2, 3, 3, 3)):
        r64 = sh(r64.detach())
        if dtype == torch.float64:  # no naive run below float64: the float64 floor alone
            assert_fa_rule(f"{what}: {name}", ours.detach(), r64, None, seed=seed,
                           floor=floor["lse" if name == "lse" else f"{name}_alone"])
        else:
            assert_fa_rule(f"{what}: {name}", ours.detach(), r64, sh(rn.detach()), factor=factor, floor=floor[name],
                           seed=seed)


@contextmanager
def _small_pieces(keys=5):
    """K/V travel in pieces of `keys` keys (uneven: 13 = 5 + 4 + 4), so the tiny test shards take
    many ring steps per block, as long sequences do."""
    saved = ring_module.RING_PIECE, ring_module.RING_FORWARD_PIECE
    ring_module.RING_PIECE = ring_module.RING_FORWARD_PIECE = keys
    try:
        yield
    finally:
        ring_module.RING_PIECE, ring_module.RING_FORWARD_PIECE = saved


def _expect(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def _misuse_cases(rank, world):
    """Bad calls raise on every rank, and the group stays usable afterwards."""
    x = torch.randn(1, 2 * world * 3 + 1, 2, 8)
    _expect(ValueError, "does not split", md.shard, x, layout="zigzag")
    _expect(ValueError, "unknown layout", md.shard, x, layout="stripe")
    q = torch.randn(1, 6 + (rank == 1), 2, 8)  # rank 1 holds one token more
    _expect(md.RingError, "disagree on q shape dim 1", md.ring_attention, q, q, q)
    k = torch.randn(1, 6, 2, 8 + (rank == 0))  # rank 0's k head_dim is wrong
    q = torch.randn(1, 6, 2, 8)
    _expect(md.RingError, r"rank\(s\) \[0\] rejected", md.ring_attention, q, k, k)
    odd = torch.randn(1, 5, 2, 8)
    _expect(md.RingError, "must be even", md.ring_attention, odd, odd, odd, causal=True, layout="zigzag")
    out = md.ring_attention(q, q, q, causal=True)  # the group still works
    assert out.shape == q.shape and torch.isfinite(out).all()


def _peer_failure_case(rank, world, *, victim, hang):
    """`victim` hangs (sleeps) or dies; every other rank must raise RingError within a bounded time."""
    timeout_s = 3.0
    group = dist.new_group(timeout=timedelta(seconds=timeout_s))
    if rank == victim:
        if hang:
            time.sleep(timeout_s + 3)
            return
        os._exit(0)  # dies without a word (its report says "ok": written below is never reached)
    q = torch.randn(1, 8, 2, 8)
    t0 = time.monotonic()
    with pytest.raises(md.RingError, match=f"rank {rank}"):
        out = md.ring_attention(q, q, q, group=group, causal=True)
        out.sum().backward()
    elapsed = time.monotonic() - t0
    assert elapsed < timeout_s + 10, f"took {elapsed:.1f}s to notice the failed peer"


def _two_ranks(rank, world, report):
    for layout in md.LAYOUTS:
        for causal in (False, True):
            _check_case(world, layout=layout, causal=causal, h=3, hkv=3, d=40)
    _check_case(world, layout="zigzag", causal=True, h=9, hkv=3, d=59, with_dlse=True)
    _check_case(world, layout="contiguous", causal=True, h=9, hkv=1, d=32, dtype=torch.float64)
    with _small_pieces():
        _check_case(world, layout="zigzag", causal=True, h=3, hkv=3, d=40)
        _check_case(world, layout="contiguous", causal=True, h=9, hkv=3, d=32, with_dlse=True)
        _check_case(world, layout="zigzag", causal=False, h=9, hkv=1, d=59, b=1)
        _check_case(world, layout="contiguous", causal=False, h=3, hkv=3, d=32, kv_chunk=21)  # Sk != Sq
        singles = [dist.new_group([r]) for r in range(world)]  # a ring of one on each rank
        _check_case(world, layout="zigzag", causal=True, h=3, hkv=1, d=40, group=singles[rank])
    _misuse_cases(rank, world)
    _peer_failure_case(rank, world, victim=1, hang=True)


def _four_ranks(rank, world, report):
    for layout in md.LAYOUTS:
        _check_case(world, layout=layout, causal=True, h=9, hkv=3, d=40, b=1)
    _check_case(world, layout="zigzag", causal=False, h=9, hkv=1, d=59, b=1, with_dlse=True)
    with _small_pieces():
        _check_case(world, layout="zigzag", causal=True, h=9, hkv=3, d=40, b=1)
        _check_case(world, layout="contiguous", causal=True, h=3, hkv=3, d=32, b=1)
    _misuse_cases(rank, world)
    if rank == 3:
        report.write_text("ok")
    _peer_failure_case(rank, world, victim=3, hang=False)


SCRIPTS = {"two_ranks": _two_ranks, "four_ranks": _four_ranks}


def test_ring_two_ranks(tmp_path, seed):
    _spawn(2, "two_ranks", tmp_path, seed)


def test_ring_four_ranks(tmp_path, seed):
    _spawn(4, "four_ranks", tmp_path, seed)


def test_needs_process_group():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="not initialised"):
        md.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="unknown layout"):
        md.ring_attention(q, q, q, layout="stripe")
