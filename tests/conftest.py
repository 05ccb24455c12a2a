"""Shared test helpers: random inputs and FlashAttention's tolerance rule."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter. The variable must be set before the
# first import of triton anywhere in the session (transformers and torch.compile import it too),
# so it is set here, when pytest loads this file, not in the Triton test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# 2-core CI: keep intra-op threads at the machine's size, and never let a test inherit a
# seed from another (fresh seeds per test, printed on failure through the test id/params).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def rand_qkv(b, sq, sk, h, hkv, d, dtype=torch.float32, seed=0, requires_grad=True):
    """Random q (b, sq, h, d), k/v (b, sk, hkv, d) in float64, plus copies in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q64 = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    k64 = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v64 = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    low = [t.to(dtype) for t in (q64, k64, v64)]
    # the float64 oracle sees exactly the values the low-precision path sees
    high = [t.double() for t in low]
    if requires_grad:
        for t in low + high:
            t.requires_grad_(True)
    return high, low


def max_err(a, b):
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    return (a - b).masked_fill(both_inf, 0).abs().max().item() if a.numel() else 0.0


def assert_fa_rule(name, ours, ref64, naive, factor=2.0, atol=1e-6):
    """FlashAttention's rule: max|ours - ref64| <= factor * max|naive_T - ref64| + atol * max(1, max|ref64|).

    The floor scales with the reference's magnitude (a few float32 ulps of its largest entry): where the naive
    error happens to be near zero (one key: softmax exactly 1) a gradient of size 14 summed over 129 rows in
    a different order is off by ~1e-6 absolute, 0.6 ulp of its size, which is rounding, not a defect."""
    err, base = max_err(ours, ref64), max_err(naive, ref64)
    finite = ref64[torch.isfinite(ref64)]
    floor = atol * max(1.0, finite.abs().max().item() if finite.numel() else 1.0)
    assert err <= factor * base + floor, f"{name}: error {err:.3e} > {factor} x naive error {base:.3e} + {floor:.1e}"


def grads(outputs, inputs, seed=123):
    """Gradients of sum(out * dout) (+ sum(lse * dlse) if lse is given) with seeded cotangents."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        cot = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
        loss = loss + (torch.where(torch.isinf(o), torch.zeros_like(o), o) * cot).sum()
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs))


@pytest.fixture
def seed(request):
    """A fresh seed per test, stable across runs so a failure reproduces."""
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)
