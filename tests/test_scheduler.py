"""Stateful property test of the engine's scheduler, without a model.

Random adds, steps and aborts under tight KV budgets (so sequences are chunked, preempted by recompute or swap,
and hit the prefix cache). The "model" writes each computed token's (token id, position) into the KV pool, so the
test also checks that every sequence's context reads back what was written for it, through prefix-cache hits,
copy-on-write, preemption and swapping. Invariants: no request lost, every sequence in exactly one queue, the
running set within max_num_seqs, each step within the token budget, progress whenever there is work, and after
everything finishes every KV block and swap slot is free.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memattn.cache import BlockManager, PagedKVCache
from memattn.engine.config import EngineConfig, SamplingParams
from memattn.engine.scheduler import Scheduler, Sequence

VOCAB = 3  # few distinct tokens: prompts share prefixes, so the prefix cache is hit often


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(2, 8), block_size=st.sampled_from([1, 2, 4]), max_seqs=st.integers(1, 4),
                budget=st.integers(1, 12), preemption=st.sampled_from(["recompute", "swap"]),
                swap_blocks=st.integers(0, 6), prefix=st.booleans())
    def setup(self, num_blocks, block_size, max_seqs, budget, preemption, swap_blocks, prefix):
        self.config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, max_num_seqs=max_seqs,
                                   max_num_batched_tokens=budget, enable_prefix_caching=prefix,
                                   preemption=preemption)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
        swap = swap_blocks if preemption == "swap" else 0
        # KV "values": channel 0 = token id, channel 1 = position, written by the fake forward pass
        self.cache = PagedKVCache(1, num_blocks, block_size, 1, 2, swap_blocks=swap)
        self.swap_blocks = swap
        self.sched = Scheduler(self.config, self.blocks, self.cache)
        self.seqs: list[Sequence] = []
        self.next_id = 0

    # ---- rules -------------------------------------------------------------------------------------

    @rule(data=st.data(), prompt_len=st.integers(1, 10), max_tokens=st.integers(1, 10), share=st.booleans())
    def add(self, data, prompt_len, max_tokens, share):
        bs, n = self.config.block_size, self.config.num_kv_blocks
        max_tokens = min(max_tokens, n * bs - prompt_len)  # as LLM.add_request: the longest request fits the pool
        if max_tokens < 1:
            return
        prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=prompt_len, max_size=prompt_len))
        if share and self.seqs:  # start with another request's tokens (prompt and output): prefix-cache hits
            other = data.draw(st.sampled_from(self.seqs)).token_ids
            prompt = (other + prompt)[:prompt_len]
        seq = Sequence(self.next_id, self.next_id, 0, prompt, prompt_len,
                       SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        self.next_id += 1
        self.seqs.append(seq)
        self.sched.add(seq)

    @rule()
    def step(self):
        self._step()

    @precondition(lambda self: any(not s.finished for s in self.seqs))
    @rule(data=st.data())
    def abort(self, data):
        live = [s for s in self.seqs if not s.finished]
        self.sched.abort(data.draw(st.sampled_from(live)))

    # ---- the fake engine step ----------------------------------------------------------------------

    def _step(self):
        had_work = self.sched.has_work()
        scheduled = self.sched.schedule()
        assert bool(scheduled) == had_work, "no progress although there is work (or work out of nothing)"
        assert sum(n for _, n in scheduled) <= self.config.max_num_batched_tokens
        assert len({s.seq_id for s, _ in scheduled}) == len(scheduled)
        bs = self.config.block_size
        for seq, n in scheduled:
            assert seq in self.sched.running and n >= 1
            assert seq.num_computed + n <= seq.num_tokens
            assert self.blocks.num_tokens(seq.seq_id) == seq.num_tokens  # blocks for every token
            self._check_context(seq)
            s = seq.num_computed
            slots = torch.tensor(self.blocks.slot_mapping(seq.seq_id, s, s + n))
            kv = torch.tensor([[t, p] for p, t in enumerate(seq.token_ids[s:s + n], start=s)], dtype=torch.float32)
            self.cache.write(slots, kv.view(n, 1, 2), kv.view(n, 1, 2))
        for seq, n in scheduled:
            seq.num_computed += n
            self.blocks.mark_computed(seq.seq_id, seq.num_computed)
            assert self.blocks.num_tokens(seq.seq_id) <= -(-seq.num_tokens // bs) * bs
        for seq, _ in scheduled:
            if seq.num_computed == seq.num_tokens:  # its last token was computed: sample the next one
                seq.token_ids.append((seq.seq_id + seq.num_tokens) % VOCAB)
                if len(seq.output_ids) >= seq.params.max_tokens:
                    seq.finish_reason = "length"
                    self.sched.finish(seq)

    def _check_context(self, seq: Sequence):
        """The KV of the sequence's computed tokens reads back as (token id, position) through its table."""
        if not seq.num_computed:
            return
        slots = torch.tensor(self.blocks.slot_mapping(seq.seq_id, 0, seq.num_computed))
        k = self.cache.key_cache(0).reshape(-1, 2)[slots]
        want = torch.tensor([[t, p] for p, t in enumerate(seq.token_ids[:seq.num_computed])], dtype=torch.float32)
        assert torch.equal(k, want), f"sequence {seq.seq_id}: context KV is not what was written"

    # ---- invariants --------------------------------------------------------------------------------

    @invariant()
    def queues_partition_live_sequences(self):
        if not hasattr(self, "sched"):
            return
        sch = self.sched
        queues = [list(sch.waiting), sch.running, list(sch.swapped)]
        placed = [s.seq_id for q in queues for s in q]
        assert len(placed) == len(set(placed)), "a sequence sits in two queues"
        live = {s.seq_id for s in self.seqs if not s.finished}
        assert set(placed) == live, "a request was lost (or a finished one still queued)"
        assert len(sch.running) <= self.config.max_num_seqs
        for s in sch.running:
            assert s.seq_id in self.blocks
        for s in list(sch.waiting) + list(sch.swapped):
            assert s.seq_id not in self.blocks
        assert all(s.swap_slots for s in sch.swapped)
        held = sum(len(s.swap_slots) for s in sch.swapped)
        assert self.cache.num_free_swap_slots + held == self.swap_blocks
        stats = self.blocks.stats()
        assert stats.used_blocks + stats.free_blocks == stats.num_blocks

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for _ in range(10_000):
            if not self.sched.has_work():
                break
            self._step()
        assert not self.sched.has_work(), "the workload did not finish"
        for s in self.seqs:
            assert s.finish_reason in ("length", "abort")
            if s.finish_reason == "length":
                assert len(s.output_ids) == s.params.max_tokens
        assert self.blocks.num_free_blocks == self.blocks.num_blocks and self.blocks.stats().used_blocks == 0
        assert self.cache.num_free_swap_slots == self.swap_blocks


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])


def test_release_swap_rejects_free_slots():
    cache = PagedKVCache(1, 4, 2, 1, 2, swap_blocks=2)
    slots = cache.swap_out([1])
    assert cache.num_free_swap_slots == 1
    cache.release_swap(slots)
    assert cache.num_free_swap_slots == 2
    with pytest.raises(ValueError, match="hold nothing"):
        cache.release_swap(slots)
