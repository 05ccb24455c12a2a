"""The scheduler: which sequences compute how many tokens this step.

As vLLM V1 there are no prefill and decode phases: a sequence has ``num_tokens`` (prompt + sampled) of
which ``num_computed`` have KV in the pool, and each step gives it tokens to catch up, within a token budget.
A long prompt is therefore prefilled in chunks beside the running decodes. Order of a step:

1. running sequences, first come first served; a sequence that needs a block when none is free preempts
   the latest running sequence (possibly itself): "recompute" frees its blocks (its prefix usually stays
   in the prefix cache) and puts it back at the head of the waiting queue; "swap" copies its blocks to the
   host tier first and resumes it from there;
2. swapped sequences, swapped back in when their blocks fit;
3. waiting sequences, admitted while blocks, ``max_num_seqs`` and the budget allow, and only if nothing
   was preempted this step. Admission looks the prompt up in the prefix cache: hit blocks count as computed.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..cache import BlockManager, PagedKVCache
from .config import EngineConfig, SamplingParams


@dataclass(eq=False)
class Sequence:
    """One completion being generated. token_ids = prompt + sampled tokens."""

    seq_id: int
    request_id: int
    index: int
    token_ids: list
    prompt_len: int
    params: SamplingParams
    generator: object = None
    num_computed: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    swap_slots: list | None = None
    num_preemptions: int = 0
    logits: list = field(default_factory=list)
    forked: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list:
        return self.token_ids[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _width(seq: Sequence) -> int:
    """Running sequences `seq` stands for: a request with n > 1 becomes n once its prompt is done (fork)."""
    return 1 if seq.forked else seq.params.n


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, cache: PagedKVCache):
        self.config, self.blocks, self.cache = config, blocks, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- blocks -----------------------------------------------------------------------------------

    def _grow(self, seq: Sequence) -> bool:
        """Give the sequence blocks for all its tokens (copy-on-write applied); False if the pool is short."""
        have = self.blocks.num_tokens(seq.seq_id)
        if have == seq.num_tokens:
            return True
        if not self.blocks.can_append(seq.seq_id, seq.num_tokens - have):
            return False
        self.cache.copy_blocks(self.blocks.append_slots(seq.seq_id, seq.token_ids[have:]))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        seq.num_preemptions += 1
        if self.config.preemption == "swap" and self._swap_out(seq):
            self.swapped.appendleft(seq)
            return
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def _swap_out(self, seq: Sequence) -> bool:
        bs = self.blocks.block_size
        table = self.blocks.block_table(seq.seq_id)[:-(-seq.num_computed // bs)]  # blocks holding computed KV
        if not table or self.cache.swap is None or len(table) > self.cache.num_free_swap_slots:
            return False  # nothing computed, or no room in the host tier: recompute instead
        seq.swap_slots = self.cache.swap_out(table)
        self.blocks.free(seq.seq_id)
        return True

    def _swap_in(self, seq: Sequence) -> bool:
        tokens = seq.token_ids[:seq.num_computed + 1]  # KV of num_computed tokens was saved
        key = ("swapped", seq.seq_id, seq.num_preemptions)  # a fresh key: no prefix hits, all blocks restored
        if not self.blocks.can_allocate(tokens, extra_key=key):
            return False
        self.blocks.allocate(seq.seq_id, tokens, extra_key=key)
        table = self.blocks.block_table(seq.seq_id)
        self.cache.swap_in(seq.swap_slots, table[:len(seq.swap_slots)])
        seq.swap_slots = None
        return True

    # ---- a step -----------------------------------------------------------------------------------

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of new tokens to compute) for this step."""
        budget = self.config.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            while not self._grow(seq):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.append((seq, n))
            budget -= n
            i += 1
        occupied = sum(_width(s) for s in self.running)  # running sequences, forks to come counted
        limit = self.config.max_num_seqs
        while self.swapped and budget > 0 and not preempted and occupied + _width(self.swapped[0]) <= limit:
            seq = self.swapped[0]
            if not self._swap_in(seq):
                break
            self.swapped.popleft()
            self.running.append(seq)
            occupied += _width(seq)
            if not self._grow(seq):
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and not preempted and not self.swapped:
            seq = self.waiting[0]
            if occupied + _width(seq) > limit or not self.blocks.can_allocate(seq.token_ids):
                break
            occupied += _width(seq)
            self.waiting.popleft()
            seq.num_computed = self.blocks.allocate(seq.seq_id, seq.token_ids)
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.append((seq, n))
            budget -= n
        return out

    def finish(self, seq: Sequence) -> None:
        """A running sequence is done: its blocks are freed (its full blocks stay in the prefix cache)."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished sequence wherever it is: its blocks, or its swapped-out copy, are freed."""
        seq.finish_reason = "abort"
        if seq in self.running:
            self.finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.swapped:
            self.swapped.remove(seq)
            self.cache.release_swap(seq.swap_slots)
            seq.swap_slots = None


__all__ = ["Sequence", "Scheduler"]
