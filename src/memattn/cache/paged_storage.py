"""Paged KV storage: the block pool that ``BlockManager`` hands out and ``paged_attention`` reads.

One tensor holds every layer's keys and values, ``(2, num_layers, num_blocks, block_size, kv_heads, head_dim)``;
``key_cache(layer)`` / ``value_cache(layer)`` are views in the layout ``paged_attention`` takes.
With a quantized ``kv_dtype`` (``kv_formats``) that tensor holds codes, the scales (and KIVI's zero points)
live beside it in tensors of the same leading shape ``(2, num_layers, num_blocks, ...)``, so copy-on-write
and swapping move a block's codes and scales together, and ``key_cache(layer)`` is a ``QuantizedPages``.
KIVI's residual window: a block being filled is held at full precision in a small pool of residual blocks
(``residual_blocks`` per layer) and quantized when its last slot is written. The cache does not learn when
the block manager frees a block, so a residual slot stays with its block until it fills or until the pool
runs short; then the least recently written one is quantized early (a finished sequence's, in practice).
Blocks can be swapped to a second tier: host memory when the pool is on an accelerator, and for a
CPU pool either more host memory or a memory-mapped file (``swap_path``).
"""
from __future__ import annotations

import math

import torch

from . import hugepages
from .kv_formats import QuantizedPages, kv_format, pack, quantize_asymmetric, quantize_symmetric


def _as_index(ids, device) -> torch.Tensor:
    return torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.int64).to(device)


class PagedKVCache:
    """Block pool for all layers, plus an optional swap tier.

    Args:
        num_layers, num_blocks, block_size, kv_heads, head_dim: pool geometry.
        dtype, device: of the pool (with a quantized kv_dtype: what reads dequantize to).
        kv_dtype: storage format, one of ``kv_formats.FORMATS``: "auto" (dtype itself), "int8", "fp8_e4m3",
            "int4", "int2".
        residual_blocks: KIVI formats: full-precision residual blocks per layer (default min(num_blocks, 64));
            one per running sequence keeps every partial block at full precision.
        swap_blocks: slots in the second tier (0 = no swapping).
        swap_path: with a CPU pool, back the second tier with a memory-mapped file at this path
            (created or overwritten); otherwise it is host memory (pinned when the pool is on CUDA).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, *,
                 dtype=torch.float32, device="cpu", kv_dtype: str = "auto", residual_blocks: int | None = None,
                 swap_blocks: int = 0, swap_path: str | None = None):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(swap_blocks, bool) or not isinstance(swap_blocks, int) or swap_blocks < 0:
            raise ValueError(f"swap_blocks must be an int >= 0, got {swap_blocks!r}")
        self.format = fmt = kv_format(kv_dtype)
        fmt.check_head_dim(head_dim)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        lead = (2, num_layers, num_blocks)
        shape = lead + (block_size, kv_heads, head_dim // fmt.pack)
        # random block reads: fewer TLB misses
        self.kv = hugepages.zeros(shape, dtype=fmt.code_dtype or dtype, device=device)
        self.meta = ()  # scales (and zero points) beside the codes, each (2, num_layers, num_blocks, ...)
        if fmt.quantized and not fmt.kivi:  # [keys, values] float32 scale per (token, head)
            self.meta = (torch.zeros(lead + (block_size, kv_heads), dtype=torch.float32, device=device),)
        elif fmt.kivi:  # keys: [scale, zero] per (block, head, channel); values: [scale, zero] per (token, head)
            self.meta = (torch.zeros(lead + (kv_heads, head_dim), dtype=torch.float16, device=device),
                         torch.zeros(lead + (block_size, kv_heads), dtype=torch.float16, device=device))
        self.residual = self.residual_map = None
        if fmt.kivi:
            r = min(num_blocks, 64) if residual_blocks is None else residual_blocks
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ValueError(f"residual_blocks must be a positive int, got {residual_blocks!r}")
            self.residual = torch.zeros((2, num_layers, r, block_size, kv_heads, head_dim), dtype=torch.float32,
                                        device=device)
            self.residual_map = torch.full((num_layers, num_blocks), -1, dtype=torch.int32, device=device)
            self._res_free = [list(range(r)) for _ in range(num_layers)]
            self._res_owner = [dict() for _ in range(num_layers)]  # residual slot -> (block, last write clock)
            self._clock = 0
        self.swap = self._second_tier(swap_blocks, swap_path) if swap_blocks else None
        self.swap_meta = tuple(torch.empty((2, num_layers, swap_blocks) + tuple(m.shape[3:]), dtype=m.dtype)
                               for m in self.meta) if swap_blocks else ()
        self._swap_residual = {}  # swap slot -> {layer: (2, bs, Hkv, D) full-precision residual} (KIVI)
        self._checked_slots = None  # (slot_mapping, its version, int64 slots) the last write validated
        self._swap_free = list(range(swap_blocks))

    def _second_tier(self, n: int, path: str | None) -> torch.Tensor:
        shape = (2, self.num_layers, n) + tuple(self.kv.shape[3:])
        if path is not None:
            if self.kv.device.type != "cpu":
                raise ValueError("swap_path (a memory-mapped file) is the second tier of a CPU pool only")
            numel = math.prod(shape) * self.kv.element_size()
            return torch.from_file(path, shared=True, size=numel, dtype=torch.uint8).view(self.kv.dtype).view(shape)
        pin = self.kv.device.type == "cuda"
        return torch.empty(shape, dtype=self.kv.dtype, pin_memory=pin)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, keys and values, scales included (not KIVI's residual pool)."""
        per = sum(t[:, :, 0].numel() * t.element_size() for t in (self.kv, *self.meta))
        return per

    def _pages(self, side: int, layer: int):
        if not self.format.quantized:
            return self.kv[side, layer]
        name = "kv"[side]
        if not self.format.kivi:
            return QuantizedPages(self.format, name, self.kv[side, layer], self.meta[0][side, layer], dtype=self.dtype)
        m = self.meta[side]  # keys: per-channel stats; values: per-token stats
        return QuantizedPages(self.format, name, self.kv[side, layer], m[0, layer], m[1, layer],
                              self.residual[side, layer], self.residual_map[layer], dtype=self.dtype)

    def key_cache(self, layer: int):
        """(num_blocks, block_size, kv_heads, head_dim) view of the layer's keys (a ``QuantizedPages`` of
        that shape for a quantized kv_dtype)."""
        return self._pages(0, layer)

    def value_cache(self, layer: int):
        return self._pages(1, layer)

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
        if self.format.kivi:
            return self._write_kivi(slots, k, v, layer)
        kv = self.kv[:, layer].view(2, total, self.kv_heads, self.kv.shape[-1])
        if not self.format.quantized:
            kv[0].index_copy_(0, slots, k.to(self.kv.dtype))
            kv[1].index_copy_(0, slots, v.to(self.kv.dtype))
            return
        scales = self.meta[0][:, layer].view(2, total, self.kv_heads)
        for side, x in enumerate((k, v)):
            codes, scale = quantize_symmetric(x.to(self.kv.device), self.format)
            kv[side].index_copy_(0, slots, codes)
            scales[side].index_copy_(0, slots, scale)

    # ---- KIVI: whole blocks to codes, partial blocks through the residual pool ----

    def _quantize_blocks(self, layer: int, ids: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor) -> None:
        """Blocks `ids` (n,) of `layer` become the KIVI codes of kb, vb (n, bs, Hkv, D)."""
        bits, per = self.format.bits, self.format.pack
        kc, ks, kz = quantize_asymmetric(kb, bits, 1)  # keys per channel over the block's tokens
        vc, vs, vz = quantize_asymmetric(vb, bits, -1)  # values per token
        km, vm = self.meta
        self.kv[0, layer][ids], self.kv[1, layer][ids] = pack(kc, per), pack(vc, per)
        km[0, layer][ids], km[1, layer][ids], vm[0, layer][ids], vm[1, layer][ids] = ks, kz, vs, vz

    def _release(self, layer: int, block: int) -> None:
        slot = int(self.residual_map[layer, block])
        self.residual_map[layer, block] = -1
        del self._res_owner[layer][slot]
        self._res_free[layer].append(slot)

    def _flush(self, layer: int, blocks) -> None:
        """Quantize the residual copies of `blocks` into their codes and free their residual slots."""
        if not blocks:
            return
        ids = _as_index(blocks, self.kv.device)
        slots = self.residual_map[layer, ids].to(torch.int64)
        self._quantize_blocks(layer, ids, self.residual[0, layer, slots], self.residual[1, layer, slots])
        for b in blocks:
            self._release(layer, b)

    def _hold(self, layer: int, block: int, keep=()) -> int:
        """A residual slot for `block` (its own if it has one), initialised from its dequantized codes. When
        the pool is full, the least recently written block not in `keep` is quantized to make room."""
        slot = int(self.residual_map[layer, block])
        if slot >= 0:
            return slot
        if not self._res_free[layer]:
            owners = [(t, b) for b, t in self._res_owner[layer].values() if b not in keep]
            if not owners:
                raise RuntimeError(f"the residual pool ({self.residual.shape[2]} blocks) is too small for one write "
                                   f"touching {len(keep)} partial blocks: raise residual_blocks")
            victim = min(owners)[1]
            self._flush(layer, [victim])
        slot = self._res_free[layer].pop()
        self.residual_map[layer, block] = slot
        ids = _as_index([block], self.kv.device)
        for side in (0, 1):
            self.residual[side, layer, slot] = self._pages(side, layer).dequantize_codes(ids)[0]
        self._res_owner[layer][slot] = (block, self._clock)
        return slot

    def _write_kivi(self, slots, k, v, layer: int) -> None:
        bs = self.block_size
        blocks, offs = slots // bs, slots % bs
        ub, inv = torch.unique(blocks, return_inverse=True)
        counts = torch.bincount(inv, minlength=ub.numel())
        held = self.residual_map[layer, ub] >= 0
        whole = (counts == bs) & ~held  # written whole by this call (slots of one call are distinct)
        if bool(whole.any()):  # straight to codes
            wb = ub[whole]
            local = torch.full_like(ub, -1)
            local[whole] = torch.arange(wb.numel(), device=ub.device)
            li = local[inv]
            sel = li >= 0
            rows = li[sel] * bs + offs[sel]
            kb = torch.empty((wb.numel() * bs, self.kv_heads, self.head_dim), dtype=torch.float32, device=ub.device)
            vb = torch.empty_like(kb)
            kb.index_copy_(0, rows, k[sel].to(torch.float32))
            vb.index_copy_(0, rows, v[sel].to(torch.float32))
            shape = (wb.numel(), bs, self.kv_heads, self.head_dim)
            self._quantize_blocks(layer, wb, kb.view(shape), vb.view(shape))
        if bool(whole.all()):
            return
        self._clock += 1
        # blocks already held first (their fills free slots), then the ones that need a slot now: one new
        # slot per sequence per step at most, so a pool of max_num_seqs blocks never runs short
        rest = ub[~whole]
        has = held[~whole]
        for group in (rest[has], rest[~has]):
            if group.numel():
                self._write_residual(layer, group, blocks, offs, k, v)

    def _write_residual(self, layer: int, group: torch.Tensor, blocks, offs, k, v) -> None:
        """The tokens of blocks `group` into their residual slots; blocks whose last slot is written are full:
        quantized and released."""
        bs = self.block_size
        ids = group.tolist()
        keep = set(ids)
        for b in ids:
            self._res_owner[layer][self._hold(layer, b, keep)] = (b, self._clock)
        part = torch.isin(blocks, group)
        rslot = self.residual_map[layer].index_select(0, blocks[part]).to(torch.int64) * bs + offs[part]
        res = self.residual[:, layer].view(2, -1, self.kv_heads, self.head_dim)
        res[0].index_copy_(0, rslot, k[part].to(torch.float32))
        res[1].index_copy_(0, rslot, v[part].to(torch.float32))
        filled = blocks[part][offs[part] == bs - 1].unique().tolist()  # last slot written: the block is full
        self._flush(layer, filled)

    def _move_residual(self, src: int, dst: int) -> None:
        """Block dst's residual state (every layer) becomes block src's (copy-on-write of a KIVI pool)."""
        for layer in range(self.num_layers):
            rs = int(self.residual_map[layer, src])
            if rs >= 0:
                rd = self._hold(layer, dst, {src})
                self.residual[:, layer, rd] = self.residual[:, layer, rs]
                self._res_owner[layer][rd] = (dst, self._clock)
            elif int(self.residual_map[layer, dst]) >= 0:
                self._release(layer, dst)

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write: for each (src, dst), block dst of every layer becomes a copy of block src
        (codes, scales and, for KIVI, the residual copy of a partial block)."""
        if not pairs:
            return
        src = _as_index([s for s, _ in pairs], self.kv.device)
        dst = _as_index([d for _, d in pairs], self.kv.device)
        for t in (self.kv, *self.meta):
            t[:, :, dst] = t[:, :, src]
        if self.format.kivi:
            for s, d in pairs:
                self._move_residual(s, d)

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
        for s in slots:
            self._swap_residual.pop(s, None)

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
        idx, sidx = _as_index(blocks, self.kv.device), _as_index(slots, "cpu")
        for t, tier in ((self.kv, self.swap), *zip(self.meta, self.swap_meta)):
            tier[:, :, sidx] = t[:, :, idx].to("cpu", non_blocking=self.swap.is_pinned())
        if self.format.kivi:  # partial blocks take a copy of their residual slots (which stay: a forked
            for b, s in zip(blocks, slots):  # sibling may still be reading the block)
                held = {}
                for layer in range(self.num_layers):
                    r = int(self.residual_map[layer, b])
                    if r >= 0:
                        held[layer] = self.residual[:, layer, r].to("cpu", copy=True)
                if held:
                    self._swap_residual[s] = held
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
        idx, sidx = _as_index(blocks, self.kv.device), _as_index(slots, "cpu")
        for t, tier in ((self.kv, self.swap), *zip(self.meta, self.swap_meta)):
            t[:, :, idx] = tier[:, :, sidx].to(self.kv.device, non_blocking=True)
        if self.format.kivi:
            for b in blocks:  # whatever residual state the (reused) blocks had is not theirs any more
                for layer in range(self.num_layers):
                    if int(self.residual_map[layer, b]) >= 0:
                        self._release(layer, b)
            for b, s in zip(blocks, slots):
                for layer, data in self._swap_residual.pop(s, {}).items():
                    r = self._hold(layer, b, set(blocks))
                    self.residual[:, layer, r] = data.to(self.kv.device)
        self._swap_free.extend(slots)


__all__ = ["PagedKVCache"]
