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

``schedule()`` decides and keeps the books (block tables, swap slots) but moves no KV: it returns a
``StepPlan`` whose block copies and swaps the model runner applies before the forward pass. After the pass,
``update(plan)`` advances the sequences and forks those that finished their prompt with ``n > 1``.

Under StreamingLLM (``engine.streaming``) a sequence holds blocks only for the tokens it computes: admission
and growth allocate the step's chunk, not the whole prompt, and ``update`` frees the blocks its window has
left behind.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from ..cache import BlockManager, PagedKVCache
from .config import EngineConfig, SamplingParams
from .sampler import make_generator


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


@dataclass
class StepPlan:
    """One engine step, as the scheduler decided it.

    scheduled: [(sequence, number of new tokens it computes)], in batch order.
    sampling: positions in `scheduled` of the sequences whose chunk reaches their last token: they get a
    logits row each, in this order, and sample.
    swap_out: [(block, swap slot)] to save; swap_in: [(swap slot, block)] to restore; copies: [(src, dst)]
    copy-on-write pairs. The runner applies them before the forward pass, in that order, copies as one
    gather then one scatter: the scheduler has already freed the blocks it swaps out or preempts, and may
    have handed them out again in this plan (as a copy's dst or for new tokens), so everything reads first.
    """

    scheduled: list = field(default_factory=list)
    sampling: list = field(default_factory=list)
    swap_out: list = field(default_factory=list)
    swap_in: list = field(default_factory=list)
    copies: list = field(default_factory=list)


def _width(seq: Sequence) -> int:
    """Running sequences `seq` stands for: a request with n > 1 becomes n once its prompt is done (fork)."""
    return 1 if seq.forked else seq.params.n


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, cache: PagedKVCache):
        self.config, self.blocks, self.cache = config, blocks, cache
        self.streaming = policy = config.streaming_policy()
        # streaming: one sequence's chunk per step is capped so that its window and chunk fit the pool
        self._chunk = config.max_num_batched_tokens
        if policy is not None:
            room = blocks.num_blocks - policy.pinned_blocks - policy.window_blocks
            if room < 1:
                raise ValueError(f"a streaming sequence holds {policy.pinned_blocks + policy.window_blocks} blocks "
                                 f"(sinks {policy.sinks}, window {policy.window}) plus its step's new tokens, but "
                                 f"the KV pool has only {blocks.num_blocks}")
            self._chunk = min(self._chunk, room * blocks.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._seq_ids = itertools.count()
        self._plan: StepPlan | None = None  # the plan schedule() is building

    def new_seq_id(self) -> int:
        """A sequence id no other sequence of this scheduler has (forks take theirs from here too)."""
        return next(self._seq_ids)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- blocks -----------------------------------------------------------------------------------

    def _upto(self, seq: Sequence, n: int) -> int:
        """Tokens the sequence needs blocks for when it computes n more: all of them, or (streaming) only
        up to the end of this step's chunk."""
        return seq.num_computed + n if self.streaming is not None else seq.num_tokens

    def _grow(self, seq: Sequence, upto: int) -> bool:
        """Give the sequence blocks for its first `upto` tokens (copy-on-write applied); False if the pool is
        short."""
        have = self.blocks.num_tokens(seq.seq_id)
        if have >= upto:
            return True
        if not self.blocks.can_append(seq.seq_id, upto - have):
            return False
        self._plan.copies += self.blocks.append_slots(seq.seq_id, seq.token_ids[have:upto])
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
        seq.swap_slots = self.cache.reserve_swap(len(table))
        self._plan.swap_out += zip(table, seq.swap_slots)
        self.blocks.free(seq.seq_id)
        return True

    def _swap_in(self, seq: Sequence) -> bool:
        tokens = seq.token_ids[:seq.num_computed + 1]  # KV of num_computed tokens was saved
        key = ("swapped", seq.seq_id, seq.num_preemptions)  # a fresh key: no prefix hits, all blocks restored
        if not self.blocks.can_allocate(tokens, extra_key=key):
            return False
        self.blocks.allocate(seq.seq_id, tokens, extra_key=key)
        table = self.blocks.block_table(seq.seq_id)
        self._plan.swap_in += zip(seq.swap_slots, table[:len(seq.swap_slots)])  # slots freed when applied
        seq.swap_slots = None
        return True

    # ---- a step -----------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan this step. Apply the plan (``model_runner.apply_plan``) before scheduling again."""
        self._plan = plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        out = plan.scheduled
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget, self._chunk)
            while not self._grow(seq, self._upto(seq, n)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                break
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
            if not self._grow(seq, seq.num_tokens):
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and not preempted and not self.swapped:
            seq = self.waiting[0]
            tokens = seq.token_ids[:self._upto(seq, min(seq.num_tokens, budget, self._chunk))]
            if occupied + _width(seq) > limit or not self.blocks.can_allocate(tokens):
                break
            occupied += _width(seq)
            self.waiting.popleft()
            seq.num_computed = self.blocks.allocate(seq.seq_id, tokens)
            self.running.append(seq)
            n = min(len(tokens) - seq.num_computed, budget)
            out.append((seq, n))
            budget -= n
        plan.sampling = [i for i, (seq, n) in enumerate(out) if seq.num_computed + n == seq.num_tokens]
        return plan

    def update(self, plan: StepPlan) -> list[list[Sequence]]:
        """The plan's forward pass ran: advance each sequence's computed count (its full blocks become
        prefix-cache entries) and fork the sequences that just finished their prompt with n > 1.

        Returns one group per entry of ``plan.sampling`` (a logits row): the sequence, then the n - 1
        forks made from it now, which sample their first token from the same row.
        """
        for seq, n in plan.scheduled:
            seq.num_computed += n
            self.blocks.mark_computed(seq.seq_id, seq.num_computed)
            if self.streaming is not None:  # blocks the next query's window has left behind
                self.blocks.evict(seq.seq_id, self.streaming.keep_from(seq.num_computed),
                                  self.streaming.pinned_blocks)
        groups = []
        for i in plan.sampling:
            seq = plan.scheduled[i][0]
            groups.append([seq] + (self._fork(seq) if seq.params.n > 1 and not seq.forked else []))
        return groups

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """After the prompt: n - 1 siblings that share its blocks (copy-on-write on their first append),
        running right behind it. Child i draws from its own generator (seed + i)."""
        parent.forked = True
        kids = []
        for i in range(1, parent.params.n):
            kid = Sequence(self.new_seq_id(), parent.request_id, i, list(parent.token_ids), parent.prompt_len,
                           parent.params, make_generator(parent.params, i), parent.num_computed, parent.arrival,
                           forked=True)
            self.blocks.fork(parent.seq_id, kid.seq_id)
            kids.append(kid)
        at = self.running.index(parent) + 1
        self.running[at:at] = kids
        return kids

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


__all__ = ["Sequence", "StepPlan", "Scheduler"]
