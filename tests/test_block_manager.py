"""Block manager: exact block ids, reference counts, eviction order, copy-on-write, prefix hits; a stateful property test."""
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from memattn.cache import BlockManager, OutOfBlocksError


def _snapshot(bm):
    return (bm.free_queue(), [bm.ref_count(b) for b in range(bm.num_blocks)],
            {s: bm.block_table(s) for s in bm._seqs}, dict(bm._cached))


def test_allocate_append_free_exact_ids():
    bm = BlockManager(10, 4)
    assert bm.allocate("a", range(10)) == 0
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.slot_mapping("a", 7, 10) == [7, 8, 9]
    s = bm.stats()
    assert (s.used_blocks, s.free_blocks, s.tokens, s.wasted_tokens) == (3, 7, 10, 2)
    assert bm.append_slots("a", [10, 11, 12]) == []  # fills block 2, opens block 3
    assert bm.block_table("a") == [0, 1, 2, 3]
    bm.free("a")
    # nothing was marked computed: no cached content, so all go to the head, first block first
    assert bm.free_queue()[:4] == [0, 1, 2, 3]
    assert all(bm.ref_count(b) == 0 for b in range(10))


def test_prefix_hits_cap_and_eviction_order():
    bm = BlockManager(8, 4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    bm.allocate("a", prompt)
    bm.mark_computed("a", 10)  # blocks 0, 1 become cached (block 2 is partial)
    assert bm.stats().cached_blocks == 2
    assert bm.allocate("b", prompt[:8] + [7, 7]) == 8  # hits blocks 0, 1
    assert bm.block_table("b") == [0, 1, 3]
    assert (bm.ref_count(0), bm.ref_count(1)) == (2, 2)
    # a prompt of exactly two cached blocks: the hit is capped at n - 1 tokens -> one block
    assert bm.allocate("c", prompt[:8]) == 4
    assert bm.block_table("c") == [0, 4]
    assert bm.allocate("d", prompt[:8], extra_key="lora-1") == 0  # another extra key: no hit
    assert bm.block_table("d") == [5, 6]
    for s in "bcd":
        bm.free(s)
    bm.free("a")
    # uncached blocks to the head (reused first); a's cached blocks to the tail, last block first
    assert bm.free_queue() == [2, 5, 6, 4, 3, 7, 1, 0]
    # eviction is lazy: reusing free blocks drops their hashes only when popped
    bm.allocate("e", range(5 * 4))
    assert bm.block_table("e") == [2, 5, 6, 4, 3]
    assert bm.stats().cached_blocks == 2
    assert bm.allocate("f", prompt) == 8  # the free cached blocks are taken back
    assert bm.block_table("f")[:2] == [0, 1] and bm.num_free_blocks == 0
    bm.free("f")
    bm.free("e")
    bm.allocate("g", range(1000, 1000 + 8 * 4))  # uses all: cached blocks evicted last
    assert bm.block_table("g")[-2:] == [1, 0]
    assert bm.stats().cached_blocks == 0


def test_fork_and_copy_on_write():
    bm = BlockManager(10, 4)
    bm.allocate("p", range(6))  # blocks [0, 1], last partial
    bm.fork("p", "c")
    assert bm.block_table("c") == [0, 1] and bm.num_free_blocks == 8
    assert (bm.ref_count(0), bm.ref_count(1)) == (2, 2)
    assert bm.append_slots("c", [6]) == [(1, 2)]  # partial shared block: copy
    assert bm.block_table("c") == [0, 2] and bm.block_table("p") == [0, 1]
    assert (bm.ref_count(1), bm.ref_count(2)) == (1, 1)
    assert bm.append_slots("p", [9]) == []  # p owns block 1 alone now
    bm.append_slots("p", [10])  # p: 8 tokens, last block full
    bm.fork("p", "q")
    assert bm.append_slots("q", [12]) == []  # full last block: no copy, a new block
    assert bm.block_table("q") == [0, 1, 3]
    bm.free("p")
    assert bm.ref_count(0) == 2  # still held by c and q


def test_failed_allocation_changes_nothing():
    bm = BlockManager(4, 4)
    bm.allocate("a", range(8))
    bm.mark_computed("a", 8)
    bm.allocate("b", range(100, 107))
    before = _snapshot(bm)
    assert not bm.can_allocate(range(20))
    with pytest.raises(OutOfBlocksError):
        bm.allocate("x", list(range(8)) + list(range(200, 212)))  # 1 hit + 4 new > 0 free
    with pytest.raises(OutOfBlocksError):
        bm.append_slots("b", range(10))
    bm.fork("b", "b2")
    with pytest.raises(OutOfBlocksError):
        bm.append_slots("b2", [1])  # needs a copy-on-write block; none free
    bm.free("b2")
    assert _snapshot(bm) == before
    assert "x" not in bm


def test_bad_calls():
    bm = BlockManager(4, 4)
    bm.allocate("a", [1])
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate("a", [1])
    with pytest.raises(ValueError, match="no tokens"):
        bm.allocate("b", [])
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.free("zz")
    with pytest.raises(ValueError, match="positive int"):
        BlockManager(0)


PREFIXES = [list(range(1, 40)), list(range(1, 9)) + list(range(50, 80)), [5] * 30]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / mark_computed. A model of the pool's contents (the token id
    written in each slot) checks that every sequence reads back its own tokens: prefix hits, forks and
    copy-on-write must never mix sequences up, and a write must never land in a shared block."""

    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(24, 4)
        self.slots = {}  # slot -> token id written there
        self.tokens = {}  # seq -> its token ids
        self.computed = {}  # seq -> tokens whose KV is written
        self.next_id = 0

    def _write(self, seq, start, end):
        for j, slot in zip(range(start, end), self.bm.slot_mapping(seq, start, end)):
            assert self.bm.ref_count(slot // 4) == 1, "a shared block was written"
            self.slots[slot] = self.tokens[seq][j]
        self.computed[seq] = end
        self.bm.mark_computed(seq, end)

    @rule(target=seqs, prefix=st.sampled_from(PREFIXES), cut=st.integers(1, 39), tail=st.lists(st.integers(0, 3), max_size=9))
    def allocate(self, prefix, cut, tail):
        ids = prefix[:cut] + tail
        seq, self.next_id = self.next_id, self.next_id + 1
        can = self.bm.can_allocate(ids)
        free_before = self.bm.num_free_blocks
        try:
            hit = self.bm.allocate(seq, ids)
        except OutOfBlocksError:
            assert not can and self.bm.num_free_blocks == free_before
            return seq  # an unknown id: later rules skip it
        assert can and hit % 4 == 0 and hit <= len(ids) - 1
        self.tokens[seq] = ids
        for j, slot in enumerate(self.bm.slot_mapping(seq, 0, hit)):
            assert self.slots.get(slot) == ids[j], "prefix hit on blocks holding other tokens"
        self._write(seq, hit, len(ids))
        return seq

    @rule(seq=seqs, new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, seq, new):
        if seq not in self.bm:
            return
        can = self.bm.can_append(seq, len(new))
        try:
            pairs = self.bm.append_slots(seq, new)
        except OutOfBlocksError:
            assert not can
            return
        assert can and len(pairs) <= 1
        for src, dst in pairs:  # copy-on-write: copy the block's contents, as PagedKVCache.copy_blocks does
            assert self.bm.ref_count(dst) == 1 and self.bm.ref_count(src) >= 1
            for off in range(4):
                if src * 4 + off in self.slots:
                    self.slots[dst * 4 + off] = self.slots[src * 4 + off]
        start = len(self.tokens[seq])
        self.tokens[seq] = self.tokens[seq] + new
        self._write(seq, start, len(self.tokens[seq]))

    @rule(target=seqs, parent=seqs)
    def fork(self, parent):
        child, self.next_id = self.next_id, self.next_id + 1
        if parent in self.bm:
            self.bm.fork(parent, child)
            self.tokens[child] = list(self.tokens[parent])
            self.computed[child] = self.computed[parent]
        return child

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq in self.bm:
            self.bm.free(seq)
            del self.tokens[seq], self.computed[seq]

    @invariant()
    def consistent(self):
        bm = self.bm
        free = bm.free_queue()
        assert len(free) == len(set(free)), "a block is in the free queue twice"
        holders = [0] * bm.num_blocks
        for seq, ids in self.tokens.items():
            table = bm.block_table(seq)
            assert len(table) == -(-len(ids) // 4) and len(set(table)) == len(table)
            for b in table:
                holders[b] += 1
            for j, slot in enumerate(bm.slot_mapping(seq, 0, self.computed[seq])):
                assert self.slots.get(slot) == ids[j], "a sequence reads another's tokens"
        for b in range(bm.num_blocks):
            assert bm.ref_count(b) == holders[b], f"block {b}: ref {bm.ref_count(b)} but {holders[b]} holders"
            assert (b in set(free)) == (holders[b] == 0), f"block {b} both free and used, or neither"
        for h, b in bm._cached.items():
            assert bm._hash[b] == h

    def teardown(self):
        for seq in list(self.tokens):
            self.bm.free(seq)
        assert sorted(self.bm.free_queue()) == list(range(self.bm.num_blocks))
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=100, deadline=None)
test_block_manager_stateful = BlockManagerMachine.TestCase
