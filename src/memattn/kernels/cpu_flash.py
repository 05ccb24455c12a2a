"""The tile primitive on PyTorch's fused CPU flash-attention kernel.

PyTorch's private ops are wrapped in exactly two functions (``_aten_forward`` and
``_aten_backward``) so that a PyTorch release can break only this place.

Quirks handled here (seen on torch 2.13):
- the op takes (B, H, S, D) with a unit last stride; our (B, S, H, D) views are passed as
  transposes, no copies;
- a mask must be additive and of q's dtype (bool is refused), so bool masks become 0 / -inf;
- a fully masked row returns out 0 but lse 0, not -inf: we set lse to -inf for those rows;
- the backward recomputes P from the lse it is given and delta from the `out` it is given,
  so passing the *global* out and lse of the rows yields this tile's exact share of dq/dk/dv.
  It cannot take an extra lse gradient, so a backward with dlse goes to the torch tile.
- no softcap: the dispatcher sends softcapped tiles to the torch tile.
"""
from __future__ import annotations

import torch

from .torch_tiles import compute_dtype

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in SUPPORTED_DTYPES and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _aten_forward(q, k, v, scale, attn_mask, is_causal):
    """(B, H, S, D) in -> out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) float32/64."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


def _aten_backward(dout, q, k, v, out, lse, scale, attn_mask, is_causal):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


def _additive(mask, bias, dtype):
    """bool mask and/or float bias -> one additive mask in `dtype` (None if neither)."""
    if mask is None and bias is None:
        return None
    add = None if bias is None else bias.to(dtype)
    if mask is not None:
        neg = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        add = neg if add is None else add + neg
    return add


def tile_forward(q, k, v, *, scale, mask=None, bias=None, softcap=0.0, causal=False):
    """Same contract as ``torch_tiles.tile_forward``; out is returned in the compute dtype."""
    if softcap:
        raise ValueError("the fused CPU tile has no softcap; use the torch tile")
    add = _additive(mask, bias, q.dtype)
    o, lse = _aten_forward(_bhsd(q), _bhsd(k), _bhsd(v), scale, add, causal)
    if mask is not None:
        visible = mask.expand(*lse.shape[:2], *mask.shape[-2:]) if mask.dim() == 4 else mask
        lse = torch.where(visible.any(dim=-1), lse, float("-inf"))
    return o.transpose(1, 2).to(compute_dtype(q.dtype)), lse.to(compute_dtype(q.dtype))


def tile_backward(dout, q, k, v, out, lse, delta, *, scale, mask=None, bias=None, softcap=0.0, causal=False):
    """Same contract as ``torch_tiles.tile_backward``; `delta` must equal rowsum(dout * out)."""
    if softcap:
        raise ValueError("the fused CPU tile has no softcap; use the torch tile")
    add = _additive(mask, bias, q.dtype)
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(compute_dtype(q.dtype))
    dq, dk, dv = _aten_backward(_bhsd(dout.to(q.dtype)), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out.to(q.dtype)),
                                lse_safe.contiguous(), scale, add, causal)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
