"""Few-row linear layers (batch-1 decode) through the native C kernel (``kernels/csrc/gemv.c``).

``linear(x, weight, bias)`` is ``torch.nn.functional.linear`` for CPU inputs of float32, bfloat16 or float16.
For at most ``MAX_ROWS`` rows of x it streams the weight once through the C kernel (float32 arithmetic, the
result rounded to x's dtype): a decode step with few rows is bound by reading the weights. On the 2-core
AMD EPYC (AVX2, no AVX512-BF16) this was written on, a whole float32 decode step ran ~25% faster than through
MKL's sgemv, and the bfloat16 one-row GEMV ~1-1.6x PyTorch's (10 GFLOP/s at 1 x 576 -> 3072), which also
stalled badly when the machine was loaded. More rows (prefill) go to PyTorch (up to ``CHUNKED_ROWS``
rows still run here, ``MAX_ROWS`` at a time): float32 as is; half precision by widening the weight to float32
for one float32 GEMM (the same arithmetic as a half-precision GEMM that accumulates in float32, faster where
the CPU has no native bfloat16 matmul; the temporary copy costs far less than the GEMM's flops).

Where the CPU multiplies the half dtype natively (AVX512-BF16 or AMX for bfloat16, AVX512-FP16 or AMX-FP16 for
float16: ``native_half_matmul``), oneDNN's half GEMM is 2-3x the float32 one (2-core EPYC with AVX512-BF16: 380
against 126, and 437 against 194 GFLOP/s in two runs), so products of more than one row stay in the half dtype through PyTorch, and only the
one-row GEMV (bandwidth-bound, where the C kernel still wins) runs here.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from . import native

MAX_ROWS = 8
# Products of up to this many rows (a short prompt's prefill) run as runs of MAX_ROWS rows, each reading the
# weight once more. Half precision: up to 4 runs read less than widening the weight to float32 for one GEMM
# (2 bytes read, 4 written, 4 read again). float32: MKL's GEMM at 16-32 rows is compute-bound at about the
# same time on 2 cores, and on a loaded machine its OpenMP threads stalled each call by a scheduler slice
# (~15 ms a call, 1.8 s for a 16-token SmolLM2 prefill; these runs: ~0.2 s).
CHUNKED_ROWS = 32
# float32 few-row products through the C kernel too (else MKL's sgemv: ~25% slower in a whole decode step here)
ROUTE_FLOAT32 = True
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# CPU flags (any one suffices) under which oneDNN multiplies the half dtype natively, accumulating in float32
_NATIVE_HALF_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


@lru_cache(maxsize=None)
def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU has a native matmul for half `dtype` (bfloat16 / float16), read from its flags."""
    flags = native.cpu_flags().split()
    return any(f in flags for f in _NATIVE_HALF_FLAGS.get(dtype, ()))


def _c_rows(dtype: torch.dtype) -> int:
    """The most rows of `dtype` that go through the C kernel: 1 where the CPU has a native half matmul."""
    return 1 if native_half_matmul(dtype) else CHUNKED_ROWS


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C kernel can run ``linear(x, weight)``: CPU, a dtype it reads, few rows, the library built."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype
            and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and native.library() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the C kernel for <= MAX_ROWS rows of CPU float32/bfloat16/float16
    (up to CHUNKED_ROWS rows in runs of MAX_ROWS; one row for a half dtype the CPU multiplies natively).

    x: (..., K), weight: (N, K), bias: (N,) or None -> (..., N) in x's dtype."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    half = x.dtype in (torch.bfloat16, torch.float16)
    c_rows = _c_rows(x.dtype)
    if not 1 <= rows <= c_rows or not supported(x, weight) or (x.dtype == torch.float32 and not ROUTE_FLOAT32):
        # widen only where the CPU lacks a native half matmul (else the half GEMM is the faster one)
        if half and x.device.type == "cpu" and rows > CHUNKED_ROWS and not native_half_matmul(x.dtype):
            b = bias.float() if bias is not None else None
            return F.linear(x.float(), weight.float(), b).to(x.dtype)
        return F.linear(x, weight, bias)
    n, k = weight.shape
    xf = x.reshape(rows, k).to(torch.float32).contiguous()
    w = weight.contiguous()
    b = bias.to(torch.float32).contiguous() if bias is not None else None
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    code, lib, yp = DTYPES[x.dtype], native.library(), y.data_ptr()
    for r0 in range(0, rows, MAX_ROWS):  # one run for decode; a short prompt's few runs read w a few times
        m = min(MAX_ROWS, rows - r0)
        rc = lib.gemv(code, code, xf[r0].data_ptr(), m, w.data_ptr(), n, k, b.data_ptr() if b is not None else None,
                      yp + r0 * n * y.element_size(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native gemv failed on sizes rows={m} n={n} k={k}")
    return y


def _small(x: torch.Tensor, *others) -> bool:
    """Whether the C elementwise steps take x (and `others`, same dtype): CPU, contiguous, few rows, a dtype
    they read, the library built."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and x.is_contiguous() and x.dim() >= 1
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and native.library() is not None
            and all(o.dtype == x.dtype and o.device.type == "cpu" and o.is_contiguous() for o in others))


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += delta`` in place (delta None: no add), then Llama's RMSNorm of x: normalised in float32, rounded to
    x's dtype, times weight (transformers' order of roundings). One C call for few-row CPU steps."""
    if not _small(x, weight, *(() if delta is None else (delta,))) or weight.numel() != x.shape[-1] \
            or (delta is not None and delta.shape != x.shape):
        if delta is not None:
            x.add_(delta)
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)
    out = torch.empty_like(x)
    d = x.shape[-1]
    native.library().add_rms_norm(DTYPES[x.dtype], x.data_ptr(), delta.data_ptr() if delta is not None else None,
                                  weight.data_ptr(), out.data_ptr(), x.numel() // d, d, eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up (..., 2N) = [gate | up] -> (..., N), rounded like ``F.silu(gate).mul_(up)``."""
    n = gate_up.shape[-1] // 2
    if not _small(gate_up):
        gate, up = gate_up.split([n, n], dim=-1)
        return F.silu(gate).mul_(up)
    out = torch.empty((*gate_up.shape[:-1], n), dtype=gate_up.dtype)
    native.library().silu_mul(DTYPES[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n)
    return out


__all__ = ["linear", "supported", "add_rms_norm", "silu_mul", "MAX_ROWS"]
