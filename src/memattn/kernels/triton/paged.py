"""Paged decode in Triton: one query per sequence against its KV cache, read through the block table.

Grid (sequence, kv head, split): each program takes the G query heads of one kv head (GQA: each
key is read once per kv head) and one contiguous range of the sequence's tokens, walks it in
BLOCK_T-token chunks (each token's physical block looked up in the table), and writes a partial
(out, lse). Long contexts are split across programs so that a small batch still fills the GPU;
the splits are then merged by their log-sum-exp.
"""
from __future__ import annotations

import torch
import triton

from ..torch_tiles import compute_dtype
from . import _kernels
from .tiles import _prec, interpreting


def _num_splits(batch, hkv, span, block_t, device) -> int:
    if interpreting() or device.type != "cuda":
        target = 2
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    most = max(1, triton.cdiv(span, block_t))
    return max(1, min(most, triton.cdiv(target, max(1, batch * hkv))))


def merge_splits(out, lse):
    """out (B, H, S, D), lse (B, H, S) partials over disjoint keys -> (B, H, D), (B, H)."""
    m = lse.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m)
    total = w.sum(-1)
    o = (w.unsqueeze(-1) * out).sum(2) / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(-1)
    return o, torch.where(total == 0, torch.full_like(total, float("-inf")), m.squeeze(-1) + torch.log(total))


def paged_decode(q, key_cache, value_cache, block_table, ctx_lens, spec):
    """q (B, 1, H, D); caches (num_blocks, block_size, Hkv, D); block_table int32 (B, max_blocks);
    ctx_lens: B context lengths (list or int tensor); spec: an ``AttentionSpec`` whose mask is None
    or a window (only its left edge matters for the last query). Returns out (B, 1, H, D) and
    lse (B, H, 1) in the compute dtype."""
    b, _, h, d = q.shape
    _, page, hkv, _ = key_cache.shape
    g = h // hkv
    dev = q.device
    cd = compute_dtype(q.dtype)
    lens = torch.as_tensor(ctx_lens, dtype=torch.int64, device=dev).reshape(b)
    left = getattr(spec.mask, "left", -1) if spec.mask is not None else -1
    starts = (lens - 1 - left).clamp(min=0) if left >= 0 else torch.zeros_like(lens)
    span = int((lens - starts).max()) if b else 0
    block_t = 16 if interpreting() else 64
    splits = _num_splits(b, hkv, span, block_t, dev)
    per_split = triton.cdiv(triton.cdiv(max(span, 1), splits), block_t) * block_t
    qx = q.reshape(b, h, d)
    qx = qx if qx.stride(-1) == 1 else qx.contiguous()
    kc, vc = key_cache, value_cache
    if kc.stride(-1) != 1 or vc.stride(-1) != 1:
        kc, vc = kc.contiguous(), vc.contiguous()
    table = block_table.to(device=dev, dtype=torch.int32).contiguous()
    part_o = torch.empty((b, h, splits, d), dtype=torch.float32, device=dev)
    part_l = torch.empty((b, h, splits), dtype=torch.float32, device=dev)
    slopes = spec.alibi_slopes
    if slopes is not None:
        slopes = slopes.to(device=dev, dtype=torch.float32)
        slopes = slopes.reshape(1, h).expand(b, h) if slopes.dim() == 1 else slopes.reshape(b, h)
        ssb = slopes.stride(0)
    else:
        ssb = 0
    if b:
        bd = max(16, triton.next_power_of_2(d))
        _kernels.paged_decode_kernel[(b, hkv, splits)](
            qx, kc, vc, table, lens, starts, slopes if slopes is not None else part_l, part_o, part_l,
            qx.stride(0), qx.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2), table.stride(0),
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1), ssb,
            g, page, per_split, d, float(spec.scale), float(spec.softcap or 1.0),
            HAS_ALIBI=slopes is not None, SOFTCAP=bool(spec.softcap), PREC=_prec(q.dtype),
            BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_T=block_t, BLOCK_D=bd,
            num_warps=1 if interpreting() else 4, num_stages=1 if interpreting() else 3)
    o, l = merge_splits(part_o, part_l)
    return o.to(cd).reshape(b, 1, h, d), l.to(cd).reshape(b, h, 1)
