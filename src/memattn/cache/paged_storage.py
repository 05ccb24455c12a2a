"""Paged KV storage: the block pool that ``BlockManager`` hands out and ``paged_attention`` reads.

One tensor holds every layer's keys and values, ``(2, num_layers, num_blocks, block_size, kv_heads, head_dim)``;
``key_cache(layer)`` / ``value_cache(layer)`` are views in the layout ``paged_attention`` takes.
Blocks can be swapped to a second tier: host memory when the pool is on an accelerator, and for a
CPU pool either more host memory or a memory-mapped file (``swap_path``).
"""
from __future__ import annotations

import math

import torch

from . import hugepages


def _as_index(ids, device) -> torch.Tensor:
    return torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.int64).to(device)


class PagedKVCache:
    """Block pool for all layers, plus an optional swap tier.

    Args:
        num_layers, num_blocks, block_size, kv_heads, head_dim: pool geometry.
        dtype, device: of the pool.
        swap_blocks: slots in the second tier (0 = no swapping).
        swap_path: with a CPU pool, back the second tier with a memory-mapped file at this path
            (created or overwritten); otherwise it is host memory (pinned when the pool is on CUDA).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, *,
                 dtype=torch.float32, device="cpu", swap_blocks: int = 0, swap_path: str | None = None):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(swap_blocks, bool) or not isinstance(swap_blocks, int) or swap_blocks < 0:
            raise ValueError(f"swap_blocks must be an int >= 0, got {swap_blocks!r}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (2, num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.kv = hugepages.zeros(shape, dtype=dtype, device=device)  # random block reads: fewer TLB misses
        self.swap = self._second_tier(swap_blocks, swap_path) if swap_blocks else None
        self._checked_slots = None  # (slot_mapping, its version, int64 slots) the last write validated
        self._swap_free = list(range(swap_blocks))

    def _second_tier(self, n: int, path: str | None) -> torch.Tensor:
        shape = (2, self.num_layers, n) + tuple(self.kv.shape[3:])
        if path is not None:
            if self.kv.device.type != "cpu":
                raise ValueError("swap_path (a memory-mapped file) is the second tier of a CPU pool only")
            numel = math.prod(shape)
            return torch.from_file(path, shared=True, size=numel, dtype=self.kv.dtype).view(shape)
        pin = self.kv.device.type == "cuda"
        return torch.empty(shape, dtype=self.kv.dtype, pin_memory=pin)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, keys and values."""
        return 2 * self.num_layers * self.block_size * self.kv_heads * self.head_dim * self.kv.element_size()

    def key_cache(self, layer: int) -> torch.Tensor:
        """(num_blocks, block_size, kv_heads, head_dim) view of the layer's keys."""
        return self.kv[0, layer]

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.kv[1, layer]

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int = 0) -> None:
        """Store new tokens: k, v (num_tokens, kv_heads, head_dim) at slots (block * block_size + offset).

        Slots < 0 are skipped (padding). slot_mapping: int32/int64 (num_tokens,).
        """
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in (torch.int32, torch.int64):
            raise TypeError("slot_mapping must be an int32 or int64 tensor")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        want = (slot_mapping.shape[0], self.kv_heads, self.head_dim)
        if slot_mapping.dim() != 1 or tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k and v must be (num_tokens, kv_heads, head_dim) = {want} for {tuple(slot_mapping.shape)} "
                             f"slots, got {tuple(k.shape)} and {tuple(v.shape)}")
        total = self.num_blocks * self.block_size
        memo = self._checked_slots
        if memo is not None and memo[0] is slot_mapping and memo[1] == slot_mapping._version:
            slots = memo[2]  # the engine writes every layer with one step's slots: checked by the first layer
        else:
            slots = slot_mapping.to(device=self.kv.device, dtype=torch.int64)
            keep = slots >= 0
            padded = not bool(keep.all())
            if padded:
                slots, k, v = slots[keep], k[keep.to(k.device)], v[keep.to(v.device)]
            if slots.numel() and int(slots.max()) >= total:
                raise ValueError(f"slot_mapping holds slot {int(slots.max())}, out of range: the pool has {total} slots")
            self._checked_slots = None if padded else (slot_mapping, slot_mapping._version, slots)
        kv = self.kv[:, layer].view(2, total, self.kv_heads, self.head_dim)
        kv[0].index_copy_(0, slots, k.to(self.kv.dtype))
        kv[1].index_copy_(0, slots, v.to(self.kv.dtype))

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write: for each (src, dst), block dst of every layer becomes a copy of block src."""
        if not pairs:
            return
        src = _as_index([s for s, _ in pairs], self.kv.device)
        dst = _as_index([d for _, d in pairs], self.kv.device)
        self.kv[:, :, dst] = self.kv[:, :, src]

    @property
    def num_free_swap_slots(self) -> int:
        """Slots of the second tier free for ``swap_out`` (0 without one)."""
        return len(self._swap_free)

    def _check_taken(self, slots) -> None:
        """Raise unless every slot holds (or is reserved for) swapped-out data, each named once."""
        taken = set(range(0 if self.swap is None else self.swap.shape[2])) - set(self._swap_free)
        if not set(slots) <= taken or len(set(slots)) != len(slots):
            raise ValueError(f"swap slots {sorted(set(slots) - taken)} hold nothing (or repeat)")

    def release_swap(self, slots) -> None:
        """Drop swapped-out data that will not be swapped in (its sequence was aborted): the slots become free."""
        slots = list(slots)
        self._check_taken(slots)
        self._swap_free.extend(slots)

    def reserve_swap(self, num: int) -> list[int]:
        """Take `num` free slots of the second tier for a later ``swap_out(blocks, slots)``.

        A scheduler reserves while it plans a step (so a second swap-out in the same plan sees the first's
        slots gone); the copy itself happens when the plan is applied, before the step runs.
        """
        if self.swap is None:
            raise RuntimeError("this cache has no second tier (swap_blocks=0)")
        if num > len(self._swap_free):
            raise RuntimeError(f"swap space full: {num} blocks asked, {len(self._swap_free)} slots free")
        slots, self._swap_free = self._swap_free[:num], self._swap_free[num:]
        return slots

    def swap_out(self, blocks, slots=None) -> list[int]:
        """Copy blocks to the second tier; return the swap slots that now hold them (for ``swap_in``).
        slots: from ``reserve_swap`` (one per block); None reserves them here.
        The blocks themselves may be reused by the caller afterwards."""
        blocks = list(blocks)
        if slots is None:
            slots = self.reserve_swap(len(blocks))
        slots = list(slots)
        if len(slots) != len(blocks):
            raise ValueError(f"{len(slots)} swap slots for {len(blocks)} blocks")
        self._check_taken(slots)
        data = self.kv[:, :, _as_index(blocks, self.kv.device)]
        self.swap[:, :, _as_index(slots, "cpu")] = data.to("cpu", non_blocking=self.swap.is_pinned())
        if self.kv.device.type == "cuda":
            torch.cuda.current_stream(self.kv.device).synchronize()
        return slots

    def swap_in(self, slots, blocks) -> None:
        """Copy swapped-out slots back into (free) blocks of the pool and release the slots."""
        if self.swap is None:
            raise RuntimeError("this cache has no second tier (swap_blocks=0)")
        slots, blocks = list(slots), list(blocks)
        if len(slots) != len(blocks):
            raise ValueError(f"{len(slots)} swap slots for {len(blocks)} blocks")
        self._check_taken(slots)
        data = self.swap[:, :, _as_index(slots, "cpu")]
        self.kv[:, :, _as_index(blocks, self.kv.device)] = data.to(self.kv.device, non_blocking=True)
        self._swap_free.extend(slots)


__all__ = ["PagedKVCache"]
