"""Block manager: which physical KV blocks each sequence owns. Pure Python, no tensors.

A sequence's tokens fill fixed-size blocks; its block table lists their physical ids in order,
so token j lives in slot ``table[j // block_size] * block_size + j % block_size``. Only the last
block of a sequence can be partly filled, which bounds the waste to one block per sequence.

- **Reference counts.** ``fork`` shares every block of a sequence (ref + 1, nothing copied).
  A block is written only while its count is 1: appending to a shared, partly filled last
  block first moves the sequence to a fresh copy (copy-on-write); the ``(src, dst)`` pairs
  returned by ``append_slots`` are for ``PagedKVCache.copy_blocks``.
- **Prefix caching.** A full block whose KV is computed (``mark_computed``) is registered under a
  chained hash of (parent hash, its token ids, extra key); a new sequence's leading full blocks are
  looked up by that chain, and a hit is accepted only if the stored token ids and parent match
  (so a hash collision is a miss, never a wrong hit). A hit covers at most n - 1 of n prompt
  tokens, so the last token is always computed (its logits are needed).
- **Free queue.** Blocks with ref 0 wait in one queue, popped from the head. A freed block
  that holds a cached prefix goes to the tail (evicted last, LRU), a sequence's blocks
  tail-first so that the end of a prefix is evicted before its start; a freed block with no
  cached content goes to the head (nothing is lost by reusing it first). Cached blocks are
  evicted lazily: their hash is dropped only when the block is popped for reuse, and a prefix
  hit on a free cached block takes it back out of the queue.
- **Eviction (StreamingLLM).** ``evict`` frees a sequence's blocks that no later query reads (a window
  has passed them), keeping ``pinned`` leading blocks (the sinks'). The sequence keeps its logical
  token positions: its table lists the pinned blocks, then the kept ones, and ``num_evicted`` tells
  how many logical blocks lie between them (``slot_mapping`` accounts for them).
- **All or nothing.** ``allocate`` and ``append_slots`` raise ``OutOfBlocksError`` and change
  nothing when there are too few free blocks; ``can_allocate`` / ``can_append`` ask first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class OutOfBlocksError(RuntimeError):
    """Too few free blocks for the request; the manager is unchanged."""


@dataclass(frozen=True)
class BlockStats:
    """A snapshot of the pool.

    used_blocks: blocks with ref > 0; free_blocks: the rest (cached or not); cached_blocks: blocks
    holding a registered prefix (used or free); tokens: tokens stored in used blocks (a shared
    block counted once); wasted_tokens: empty slots of used blocks (partly filled last blocks);
    utilization: tokens / (used_blocks * block_size), 1.0 for an empty pool.
    """

    num_blocks: int
    block_size: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int
    tokens: int
    wasted_tokens: int
    utilization: float


@dataclass
class _Sequence:
    blocks: list[int]
    token_ids: list[int]
    extra_key: object = None
    hashes: list[int] = field(default_factory=list)  # chained hashes of its first full, computed blocks
    pinned: int = 0  # leading blocks eviction keeps
    evicted: int = 0  # logical blocks pinned .. pinned + evicted - 1 were freed (not in `blocks`)

    def index(self, logical: int) -> int:
        """Position in `blocks` of logical block `logical` (one that was not evicted)."""
        return logical if logical < self.pinned else logical - self.evicted

    @property
    def logical_blocks(self) -> int:
        return len(self.blocks) + self.evicted


class BlockManager:
    """Allocate, grow, fork and free sequences of fixed-size KV blocks.

    Args:
        num_blocks: physical blocks in the pool (ids 0 .. num_blocks - 1).
        block_size: tokens per block (default 16, as vLLM).
        enable_prefix_caching: share full blocks across sequences with equal prefixes.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, *, enable_prefix_caching: bool = True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = next reused
        self._hash = [None] * num_blocks  # registered hash of a cached block
        self._key: list[tuple | None] = [None] * num_blocks  # (parent hash, token ids, extra key) it was cached under
        self._cached: dict[int, int] = {}  # hash -> block id
        self._seqs: dict[object, _Sequence] = {}

    # ---- queries -------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id) -> list[int]:
        """Physical block ids of the sequence, in logical order (a copy)."""
        return list(self._seq(seq_id).blocks)

    def num_tokens(self, seq_id) -> int:
        return len(self._seq(seq_id).token_ids)

    def num_evicted(self, seq_id) -> int:
        """Logical blocks evicted from the sequence (they sat right after its pinned blocks)."""
        return self._seq(seq_id).evicted

    def slot_mapping(self, seq_id, start: int, end: int) -> list[int]:
        """Cache slots (block * block_size + offset) of the sequence's tokens [start, end)."""
        seq, bs = self._seq(seq_id), self.block_size
        if not 0 <= start <= end <= len(seq.token_ids):
            raise ValueError(f"token range [{start}, {end}) outside the sequence's {len(seq.token_ids)} tokens")
        if seq.evicted and start < end and seq.pinned <= start // bs < seq.pinned + seq.evicted:
            raise ValueError(f"token {start} lies in an evicted block")
        return [seq.blocks[seq.index(j // bs)] * bs + j % bs for j in range(start, end)]

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids in the order they will be reused (head first)."""
        return list(self._free)

    def stats(self) -> BlockStats:
        bs = self.block_size
        filled: dict[int, int] = {}
        for seq in self._seqs.values():
            n = len(seq.token_ids)
            for i, blk in enumerate(seq.blocks):
                logical = i if i < seq.pinned else i + seq.evicted
                filled[blk] = max(filled.get(blk, 0), min(bs, n - logical * bs))
        tokens = sum(filled.values())
        used = len(filled)
        return BlockStats(self.num_blocks, bs, used, len(self._free), len(self._cached), tokens,
                          used * bs - tokens, tokens / (used * bs) if used else 1.0)

    # ---- prefix cache --------------------------------------------------------------------------------

    def _block_keys(self, token_ids, extra_key, parent, first: int, last: int):
        """(key, hash) of full blocks first .. last - 1, chained from `parent`."""
        bs = self.block_size
        for i in range(first, last):
            key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]), extra_key)
            parent = hash(key)
            yield key, parent

    def _match(self, token_ids, extra_key) -> tuple[list[int], list[int]]:
        """Cached blocks (and their hashes) holding the longest prefix of at most n - 1 tokens."""
        blocks, hashes = [], []
        if not self.enable_prefix_caching:
            return blocks, hashes
        for key, h in self._block_keys(token_ids, extra_key, None, 0, (len(token_ids) - 1) // self.block_size):
            blk = self._cached.get(h)
            if blk is None or self._key[blk] != key:
                break
            blocks.append(blk)
            hashes.append(h)
        return blocks, hashes

    def mark_computed(self, seq_id, num_tokens: int) -> None:
        """Declare that the KV of the sequence's first `num_tokens` tokens is written: its full blocks
        among them become prefix-cache entries (a block whose content is already cached elsewhere
        is left unregistered). Call after the forward pass that wrote them."""
        seq = self._seq(seq_id)
        if not self.enable_prefix_caching:
            return
        upto = min(num_tokens, len(seq.token_ids)) // self.block_size
        parent = seq.hashes[-1] if seq.hashes else None
        for i, (key, h) in enumerate(self._block_keys(seq.token_ids, seq.extra_key, parent, len(seq.hashes), upto),
                                     start=len(seq.hashes)):
            if seq.pinned <= i < seq.pinned + seq.evicted:  # freed by eviction: its hash only chains on
                seq.hashes.append(h)
                continue
            blk = seq.blocks[seq.index(i)]
            if h not in self._cached and self._hash[blk] is None:
                self._cached[h], self._hash[blk], self._key[blk] = blk, h, key
            seq.hashes.append(h)

    # ---- allocation ----------------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> int:
        """Pop the head of the free queue, dropping any prefix it still caches (lazy eviction)."""
        blk, _ = self._free.popitem(last=False)
        h = self._hash[blk]
        if h is not None:
            del self._cached[h]
            self._hash[blk] = self._key[blk] = None
        self._ref[blk] = 1
        return blk

    def _allocation_cost(self, token_ids, extra_key):
        hits, hashes = self._match(token_ids, extra_key)
        revived = sum(1 for blk in hits if self._ref[blk] == 0)  # hits waiting in the free queue
        return hits, hashes, self._blocks_for(len(token_ids)) - len(hits) + revived

    def can_allocate(self, token_ids, *, extra_key=None) -> bool:
        """Whether ``allocate`` of this prompt would succeed now (prefix hits counted)."""
        return self._allocation_cost(token_ids, extra_key)[2] <= len(self._free)

    def allocate(self, seq_id, token_ids, *, extra_key=None) -> int:
        """Give a new sequence blocks for its prompt; return how many leading tokens are already
        computed (prefix-cache hits, a multiple of block_size, at most len(token_ids) - 1).

        extra_key: anything hashable that must also match for a prefix hit (adapter id, salt, ...).
        Raises OutOfBlocksError (nothing changed) if the pool is too small right now.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("cannot allocate a sequence with no tokens")
        hits, hashes, cost = self._allocation_cost(token_ids, extra_key)
        if cost > len(self._free):
            raise OutOfBlocksError(f"prompt of {len(token_ids)} tokens needs {cost} free blocks, "
                                   f"{len(self._free)} are free")
        for blk in hits:
            if self._ref[blk] == 0:
                del self._free[blk]
            self._ref[blk] += 1
        fresh = [self._take_free() for _ in range(self._blocks_for(len(token_ids)) - len(hits))]
        self._seqs[seq_id] = _Sequence(hits + fresh, token_ids, extra_key, hashes)
        return len(hits) * self.block_size

    def _needs_copy(self, seq: _Sequence) -> bool:
        """The last block is partly filled and shared: the next append must copy it first."""
        return len(seq.token_ids) % self.block_size != 0 and self._ref[seq.blocks[-1]] > 1

    def _append_cost(self, seq: _Sequence, num_new: int) -> int:
        if num_new == 0:
            return 0
        return self._blocks_for(len(seq.token_ids) + num_new) - seq.logical_blocks + self._needs_copy(seq)

    def can_append(self, seq_id, num_new_tokens: int = 1) -> bool:
        return self._append_cost(self._seq(seq_id), num_new_tokens) <= len(self._free)

    def append_slots(self, seq_id, token_ids) -> list[tuple[int, int]]:
        """Append tokens (ids) to a sequence, growing its blocks; return copy-on-write (src, dst) pairs.

        A pair appears only when the sequence's last block is partly filled and shared: the
        sequence moves to dst, and the caller must copy src's KV to dst before writing the new
        tokens. Raises OutOfBlocksError (nothing changed) if the pool is too small right now.
        """
        seq = self._seq(seq_id)
        token_ids = list(token_ids)
        cost = self._append_cost(seq, len(token_ids))
        if cost > len(self._free):
            raise OutOfBlocksError(f"appending {len(token_ids)} tokens needs {cost} free blocks, "
                                   f"{len(self._free)} are free")
        pairs = []
        if token_ids and self._needs_copy(seq):
            src = seq.blocks[-1]
            self._ref[src] -= 1
            seq.blocks[-1] = self._take_free()
            pairs.append((src, seq.blocks[-1]))
        seq.token_ids.extend(token_ids)
        seq.blocks.extend(self._take_free() for _ in range(self._blocks_for(len(seq.token_ids)) - seq.logical_blocks))
        return pairs

    def fork(self, parent_id, child_id) -> None:
        """The child shares every block of the parent (ref + 1 each, nothing copied)."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} is already allocated")
        for blk in parent.blocks:
            self._ref[blk] += 1
        self._seqs[child_id] = _Sequence(list(parent.blocks), list(parent.token_ids), parent.extra_key,
                                         list(parent.hashes), parent.pinned, parent.evicted)

    def free(self, seq_id) -> None:
        """Release the sequence; blocks whose count reaches 0 join the free queue, last block first."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        self._release(reversed(seq.blocks))

    def _release(self, blocks) -> None:
        for blk in blocks:
            if self._ref[blk] <= 0:
                raise AssertionError(f"block {blk} freed twice")
            self._ref[blk] -= 1
            if self._ref[blk] == 0:
                self._free[blk] = None
                if self._hash[blk] is None:
                    self._free.move_to_end(blk, last=False)

    def evict(self, seq_id, keep_from: int, pinned: int) -> int:
        """Free the sequence's blocks that lie wholly before token `keep_from`, except its first `pinned`
        logical blocks (StreamingLLM: the sinks' blocks; the window has passed the others). Logical token
        positions are unchanged; ``slot_mapping`` of an evicted token is an error. Returns how many
        blocks were released. `pinned` must be the same on every call for a sequence."""
        seq = self._seq(seq_id)
        if seq.evicted and pinned != seq.pinned:
            raise ValueError(f"sequence {seq_id!r} was evicted with {seq.pinned} pinned blocks, now {pinned}")
        seq.pinned = pinned
        first = pinned + seq.evicted  # the first kept block after the pinned ones
        upto = min(keep_from // self.block_size, seq.logical_blocks - 1)  # never the last (partial) block
        if upto <= first:
            return 0
        gone = seq.blocks[pinned:pinned + upto - first]
        del seq.blocks[pinned:pinned + upto - first]
        seq.evicted += len(gone)
        self._release(gone)
        return len(gone)

    def _seq(self, seq_id) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None


__all__ = ["BlockManager", "BlockStats", "OutOfBlocksError"]
