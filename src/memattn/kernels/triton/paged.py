"""Paged decode in Triton: one query per sequence against its KV cache, read through the block table.

Grid (sequence, kv head, split): each program takes the G query heads of one kv head (GQA: each
key is read once per kv head) and one contiguous range of the sequence's tokens, walks it in
BLOCK_T-token chunks (each token's physical block looked up in the table), and writes a partial
(out, lse). Long contexts are split across programs so that a small batch still fills the GPU;
the splits are then merged by their log-sum-exp (``kernels.merge.merge_partials``).
"""
from __future__ import annotations

import torch
import triton

from ..merge import merge_partials
from ..paged_decode import alibi_lse_shift, require_plain
from ..torch_tiles import compute_dtype
from . import _kernels
from .tiles import _prec, _unit_last, interpreting


def _num_splits(batch, hkv, span, block_t, device) -> int:
    if interpreting() or device.type != "cuda":
        target = 2
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    most = max(1, triton.cdiv(span, block_t))
    return max(1, min(most, triton.cdiv(target, max(1, batch * hkv))))


def paged_decode(q, key_cache, value_cache, block_table, ranges, *, scale, softcap=0.0, alibi_slopes=None,
                 query_pos=None, sinks=None, kv_scales=None):
    """The ``kernels.paged_decode`` contract: q (B, H, D) -> out (B, H, D), lse (B, H) in the compute dtype."""
    require_plain("triton", ranges, sinks, kv_scales)
    b, h, d = q.shape
    _, page, hkv, _ = key_cache.shape
    g = h // hkv
    dev = q.device
    cd = compute_dtype(q.dtype)
    # the kernel takes each sequence's one range as two int64 arrays; its ALiBi puts the query at lens - 1
    starts, lens = ranges[:, 0, 0].contiguous(), ranges[:, 0, 1].contiguous()
    span = int((lens - starts).max()) if b else 0
    block_t = 16 if interpreting() else 64
    splits = _num_splits(b, hkv, span, block_t, dev)
    per_split = triton.cdiv(triton.cdiv(max(span, 1), splits), block_t) * block_t
    qx = _unit_last(q)
    kc, vc = key_cache, value_cache
    if kc.stride(-1) != 1 or vc.stride(-1) != 1:
        kc, vc = kc.contiguous(), vc.contiguous()
    table = block_table.to(device=dev, dtype=torch.int32).contiguous()
    part_o = torch.empty((b, h, splits, d), dtype=torch.float32, device=dev)
    part_l = torch.empty((b, h, splits), dtype=torch.float32, device=dev)
    slopes = None if alibi_slopes is None else _unit_last(alibi_slopes)  # the kernel reads a row's heads in a run
    if b:
        bd = max(16, triton.next_power_of_2(d))
        _kernels.paged_decode_kernel[(b, hkv, splits)](
            qx, kc, vc, table, lens, starts, slopes if slopes is not None else part_l, part_o, part_l,
            qx.stride(0), qx.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2), table.stride(0),
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1),
            slopes.stride(0) if slopes is not None else 0,
            g, page, per_split, d, float(scale), float(softcap or 1.0),
            HAS_ALIBI=slopes is not None, SOFTCAP=bool(softcap), PREC=_prec(q.dtype),
            BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_T=block_t, BLOCK_D=bd,
            num_warps=1 if interpreting() else 4, num_stages=1 if interpreting() else 3)
    o, l = merge_partials(part_o, part_l, 2)
    return o.to(cd), alibi_lse_shift(l, slopes, query_pos, ranges).to(cd)
