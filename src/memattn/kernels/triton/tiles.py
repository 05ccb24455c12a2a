"""The tile primitive in Triton: the contract of ``memattn.kernels.torch_tiles``, fused.

``tile_forward`` runs FlashAttention-2's online softmax over the tile's keys in BLOCK_N chunks
(one program per (query block, batch, head)); ``tile_backward`` runs one kernel for dq (over
key chunks) and one for dk/dv (over query chunks and the G query heads of a kv head), so no
atomics are needed: the blockwise schedule sums the tiles' shares.

Inputs: float16, bfloat16 or float32 (float32 accumulation; float32 dots in IEEE precision).
Any head dim (padded to a power of two inside the kernels). Mask/bias broadcast to
(B, H, tq, tk) and are read through zero strides, never expanded in memory.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU
tensors with numpy; the launcher then uses small blocks.
"""
from __future__ import annotations

import os

import torch
import triton

from .. import torch_tiles
from ..._finite import has_nonfinite
from ..torch_tiles import compute_dtype
from . import _kernels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(q: torch.Tensor) -> bool:
    """True where these kernels can run q: CUDA tensors, or CPU tensors under the interpreter except bfloat16
    (the interpreter runs on numpy, which has no bfloat16: its loads come back garbled, so it is refused)."""
    return q.dtype in SUPPORTED_DTYPES and (q.is_cuda or (interpreting() and q.device.type == "cpu"
                                                          and q.dtype != torch.bfloat16))


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _broadcast4(t, b, h, tq, tk, dtype):
    """A mask/bias broadcastable to (B, H, tq, tk) -> (tensor, its 4 strides) with zero strides
    where it broadcasts (no copy of the broadcast), or (dummy, zeros) for None."""
    if t is None:
        return None, (0, 0, 0, 0)
    t = t.to(dtype)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    t = t.expand(b, h, tq, tk)
    return t, tuple(t.stride())


def _blocks(dtype, d, backward=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this dtype and padded head dim."""
    if interpreting():
        return 16, 16, 1, 1
    wide = dtype == torch.float32 or d > 128
    if backward:
        return (32, 32, 4, 2) if wide else (64, 64, 4 if d <= 64 else 8, 2)
    if wide:
        return 64, 32, 4, 2
    return (128, 64, 4, 3) if d <= 64 else (128, 64, 8, 3)


def _prec(dtype):
    """tl.dot input precision: IEEE for float32 (no TF32 rounding), the default for half precision."""
    return "ieee" if dtype == torch.float32 else None


def _common(q, k, mask, bias):
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    mask_t, ms = _broadcast4(mask, b, h, tq, tk, torch.int8)
    bias_t, bs = _broadcast4(bias, b, h, tq, tk, torch.float32)
    return b, tq, h, d, tk, hkv, mask_t, ms, bias_t, bs


def _hides_nonfinite(q, k, v, mask, causal) -> bool:
    """A masked tile with a NaN/inf input: the kernel's masked products (0 * NaN) would leak it into rows that
    cannot see it, so such (rare) tiles go to the torch tile, which follows the reference there. Checked under
    the interpreter (CPU tensors) only: on CUDA the check would cost a host sync per tile."""
    return not q.is_cuda and (mask is not None or causal) and has_nonfinite(q, k, v)


def tile_forward(q, k, v, *, scale, mask=None, bias=None, softcap=0.0, causal=False):
    """Same contract as ``torch_tiles.tile_forward``: out (B, tq, H, D) and lse (B, H, tq), float32."""
    if _hides_nonfinite(q, k, v, mask, causal):
        return torch_tiles.tile_forward(q, k, v, scale=scale, mask=mask, bias=bias, softcap=softcap, causal=causal)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, tq, h, d, tk, hkv, mask_t, ms, bias_t, bs = _common(q, k, mask, bias)
    cd = compute_dtype(q.dtype)
    out = torch.empty((b, tq, h, d), dtype=cd, device=q.device)
    lse = torch.empty((b, h, tq), dtype=cd, device=q.device)
    if b * h * tq == 0:
        return out, lse
    bd = max(16, triton.next_power_of_2(d))
    bm, bn, warps, stages = _blocks(q.dtype, bd)
    grid = (triton.cdiv(tq, bm), b * h)
    _kernels.tile_fwd_kernel[grid](
        q, k, v, out, lse, mask_t if mask_t is not None else q, bias_t if bias_t is not None else q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), *ms, *bs,
        h, h // hkv, tq, tk, d, float(scale), float(softcap or 1.0),
        CAUSAL=bool(causal), HAS_MASK=mask_t is not None, HAS_BIAS=bias_t is not None, SOFTCAP=bool(softcap),
        PREC=_prec(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    return out, lse


def tile_backward(dout, q, k, v, out, lse, delta, *, scale, mask=None, bias=None, softcap=0.0, causal=False):
    """Same contract as ``torch_tiles.tile_backward`` (global lse and delta = rowsum(dout*out) - dlse);
    returns dq (B, tq, H, D), dk, dv (B, tk, Hkv, D) in float32."""
    if delta is None:
        delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1).transpose(1, 2)
    if _hides_nonfinite(q, k, v, mask, causal):
        return torch_tiles.tile_backward(dout, q, k, v, out, lse, delta, scale=scale, mask=mask, bias=bias,
                                         softcap=softcap, causal=causal)
    # dq shares q's (contiguous) strides and dk/dv share k's: the kernels read and write through them
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    b, tq, h, d, tk, hkv, mask_t, ms, bias_t, bs = _common(q, k, mask, bias)
    cd = compute_dtype(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    delta = delta.to(torch.float32).contiguous()
    dq = torch.empty(q.shape, dtype=cd, device=q.device)
    dk = torch.empty(k.shape, dtype=cd, device=k.device)
    dv = torch.empty(v.shape, dtype=cd, device=v.device)
    if b * h * tq == 0 or tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bd = max(16, triton.next_power_of_2(d))
    bm, bn, warps, stages = _blocks(q.dtype, bd, backward=True)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), lse.stride(0), lse.stride(1), *ms, *bs)
    flags = dict(CAUSAL=bool(causal), HAS_MASK=mask_t is not None, HAS_BIAS=bias_t is not None,
                 SOFTCAP=bool(softcap), PREC=_prec(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                 num_warps=warps, num_stages=stages)
    mp = mask_t if mask_t is not None else q
    bp = bias_t if bias_t is not None else q
    sc = float(softcap or 1.0)
    _kernels.tile_bwd_dq_kernel[(triton.cdiv(tq, bm), b * h)](
        dout, q, k, v, lse, delta, dq, mp, bp, *strides, h, h // hkv, tq, tk, d, float(scale), sc, **flags)
    _kernels.tile_bwd_dkdv_kernel[(triton.cdiv(tk, bn), b * hkv)](
        dout, q, k, v, lse, delta, dk, dv, mp, bp, *strides, hkv, h // hkv, tq, tk, d, float(scale), sc, **flags)
    return dq, dk, dv
