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
- an empty tile (no query, no key, batch or heads 0) kills the process with SIGFPE (the kernel divides
  by the length): ``tile_forward`` / ``tile_backward`` answer those themselves, never calling it.
- a row whose scores are all NaN (a NaN in its query) comes back as out 0, lse 0, as if fully masked; a
  row with a +inf score (an inf query or key) comes back as out 0, lse +inf, not NaN;
  and an additive -inf mask does not hide a NaN/inf query, key or value (inf + -inf is NaN, 0 * inf is NaN).
  Such tiles (lse exactly 0 on a row that sees a key; a masked tile whose out holds NaN/inf, or whose
  keys/values do in the backward) are recomputed by the torch tile, which follows the reference there.
"""
from __future__ import annotations

import torch

from . import torch_tiles
from .._finite import has_nonfinite
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


def _empty(q, k) -> bool:
    """A tile the kernel must not see: no query, no key, no batch or no head (it divides by them)."""
    return q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0 or q.shape[2] == 0


def _masked(mask, causal) -> bool:
    return mask is not None or causal


def tile_forward(q, k, v, *, scale, mask=None, bias=None, softcap=0.0, causal=False):
    """Same contract as ``torch_tiles.tile_forward``; out is returned in the compute dtype."""
    if softcap:
        raise ValueError("the fused CPU tile has no softcap; use the torch tile")
    cd = compute_dtype(q.dtype)
    if _empty(q, k):
        b, tq, h, d = q.shape
        return (torch.zeros((b, tq, h, v.shape[-1]), dtype=cd, device=q.device),
                torch.full((b, h, tq), float("-inf"), dtype=cd, device=q.device))
    kw = dict(scale=scale, mask=mask, bias=bias, causal=causal)
    add = _additive(mask, bias, q.dtype)
    o, lse = _aten_forward(_bhsd(q), _bhsd(k), _bhsd(v), scale, add, causal)
    if mask is not None:
        visible = mask.expand(*lse.shape[:2], *mask.shape[-2:]) if mask.dim() == 4 else mask
        seen = visible.any(dim=-1)
        lse = torch.where(seen, lse, float("-inf"))
        o = torch.where(seen.unsqueeze(-1), o, 0.0)  # a fully masked row is 0 even with NaN in its query
    # A seen row reported as unseen (all its scores NaN; or a true lse of 0), a row with a +inf score (lse
    # +inf: the kernel returns out 0 there, where the softmax is exp(inf - inf) = NaN), or in a masked tile
    # any NaN/inf in out (a non-finite input the additive mask may have leaked; checking the one output is
    # cheaper than the three inputs): the torch tile recomputes it.
    if bool(((lse == 0) | torch.isposinf(lse)).any()) or (_masked(mask, causal) and has_nonfinite(o)):
        return torch_tiles.tile_forward(q, k, v, **kw)
    return o.transpose(1, 2).to(cd), lse.to(cd)


def tile_backward(dout, q, k, v, out, lse, delta, *, scale, mask=None, bias=None, softcap=0.0, causal=False):
    """Same contract as ``torch_tiles.tile_backward``; `delta` must equal rowsum(dout * out)."""
    if softcap:
        raise ValueError("the fused CPU tile has no softcap; use the torch tile")
    if _empty(q, k):
        cd = compute_dtype(q.dtype)
        return torch.zeros(q.shape, dtype=cd, device=q.device), torch.zeros(k.shape, dtype=cd, device=k.device), \
            torch.zeros(v.shape, dtype=cd, device=v.device)
    # an unseen row (lse -inf) enters the kernel as lse 0 (its p is exactly 0 there through the mask); what stays
    # non-finite is a NaN query row (its lse NaN) -- one reduction, where boolean indexing copied lse each tile
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(compute_dtype(q.dtype))
    # that row, or a NaN/inf input a masked tile may leak into dq, dk, dv (NaN + -inf): the torch tile
    if has_nonfinite(lse_safe) or (_masked(mask, causal) and has_nonfinite(q, k, v)):
        delta = (dout.to(compute_dtype(q.dtype)) * out.to(compute_dtype(q.dtype))).sum(-1).transpose(1, 2)
        return torch_tiles.tile_backward(dout, q, k, v, out, lse, delta, scale=scale, mask=mask, bias=bias,
                                         causal=causal)
    add = _additive(mask, bias, q.dtype)
    dq, dk, dv = _aten_backward(_bhsd(dout.to(q.dtype)), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out.to(q.dtype)),
                                lse_safe.contiguous(), scale, add, causal)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
