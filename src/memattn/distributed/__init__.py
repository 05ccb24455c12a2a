"""Sequence (context) parallel attention on torch.distributed: ring attention and its sharding helpers.

    import memattn.distributed as md
    md.init_process_group(timeout_s=60)          # under torchrun; gloo on CPU, NCCL on GPU
    q, k, v = (md.shard(t, layout="zigzag") for t in (q_full, k_full, v_full))
    out = md.ring_attention(q, k, v, causal=True, layout="zigzag")
    full = md.unshard(out, layout="zigzag")
"""
from .comm import RingError, init_process_group
from .ring import LAYOUTS, ring_attention, shard, unshard

__all__ = ["ring_attention", "shard", "unshard", "init_process_group", "RingError", "LAYOUTS"]
