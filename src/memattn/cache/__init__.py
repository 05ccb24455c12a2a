"""KV caches: contiguous (``KVCache``, ``SlidingWindowKVCache``) and paged (``BlockManager`` + ``PagedKVCache``).

The paged pair splits the work as vLLM does: ``BlockManager`` (pure Python) decides which physical
blocks each sequence owns, ``PagedKVCache`` holds the tensors, and ``memattn.paged_attention`` reads them
through a block table.
"""
from .block_manager import BlockManager, BlockStats, OutOfBlocksError
from .contiguous import KVCache, SlidingWindowKVCache
from .paged_storage import PagedKVCache

__all__ = ["KVCache", "SlidingWindowKVCache", "BlockManager", "BlockStats", "OutOfBlocksError", "PagedKVCache"]
