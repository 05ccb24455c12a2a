"""Few-row linear layers (batch-1 decode) through the native C kernel (``kernels/csrc/gemv.c``).

``linear(x, weight, bias)`` is ``torch.nn.functional.linear`` for CPU inputs of float32, bfloat16 or float16.
For at most ``MAX_ROWS`` rows of x it streams the weight once through the C kernel (float32 arithmetic, the
result rounded to x's dtype): a decode step with few rows is bound by reading the weights, and PyTorch's
bfloat16 GEMV on CPUs without AVX512-BF16 runs far below the memory bandwidth. More rows (prefill) go to
PyTorch: float32 as is; half precision by widening the weight to float32 for one float32 GEMM (the same
arithmetic as a half-precision GEMM that accumulates in float32, faster where the CPU has no native
bfloat16 matmul; the temporary copy costs far less than the GEMM's flops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native

MAX_ROWS = 8
# float32 few-row products through the C kernel too (else MKL's sgemv, about as fast)
ROUTE_FLOAT32 = False
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C kernel can run ``linear(x, weight)``: CPU, a dtype it reads, few rows, the library built."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype
            and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and native.library() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the C kernel for <= MAX_ROWS rows of CPU float32/bfloat16/float16."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 1 <= rows <= MAX_ROWS or not supported(x, weight) or (x.dtype == torch.float32 and not ROUTE_FLOAT32):
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and rows > MAX_ROWS:
            b = bias.float() if bias is not None else None
            return F.linear(x.float(), weight.float(), b).to(x.dtype)
        return F.linear(x, weight, bias)
    n, k = weight.shape
    xf = x.reshape(rows, k).to(torch.float32).contiguous()
    w = weight.contiguous()
    b = bias.to(torch.float32).contiguous() if bias is not None else None
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    code = DTYPES[x.dtype]
    rc = native.library().gemv(code, code, xf.data_ptr(), rows, w.data_ptr(), n, k,
                               b.data_ptr() if b is not None else None, y.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native gemv failed on sizes rows={rows} n={n} k={k}")
    return y


__all__ = ["linear", "supported", "MAX_ROWS"]
