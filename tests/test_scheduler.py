"""Stateful property test of the engine's scheduler, without a model.

Random adds (some with n > 1 completions), steps and aborts under tight KV budgets (so sequences are chunked,
forked, preempted by recompute or swap, and hit the prefix cache). Each step applies the scheduler's plan with the
model runner's ``apply_plan``, then the "model" writes each computed token's (token id, position) into the KV pool,
so the test also checks that every sequence's context reads back what was written for it, through prefix-cache
hits, forks, copy-on-write, preemption and swapping. Invariants: no request lost, every sequence in exactly one
queue, the running set within max_num_seqs (forks counted), each step within the token budget, progress whenever
there is work, a request that ran to its length has its n completions, and after everything finishes every KV
block and swap slot is free.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memattn.cache import BlockManager, PagedKVCache
from memattn.engine.config import EngineConfig, SamplingParams
from memattn.engine.model_runner import apply_plan
from memattn.engine.scheduler import Scheduler, Sequence

VOCAB = 3  # few distinct tokens: prompts share prefixes, so the prefix cache is hit often


def _written(token_ids, start: int = 0) -> torch.Tensor:
    """The fake model's KV of tokens at positions start, start + 1, ...: (token id, position) each, (T, 2)."""
    return torch.tensor([[t, p] for p, t in enumerate(token_ids, start=start)], dtype=torch.float32).view(-1, 2)


def _context(sched: Scheduler, seq: Sequence) -> torch.Tensor:
    """The KV of the sequence's computed tokens, read through its block table (T, 2)."""
    slots = torch.tensor(sched.blocks.slot_mapping(seq.seq_id, 0, seq.num_computed), dtype=torch.int64)
    return sched.cache.key_cache(0).reshape(-1, 2)[slots]


def _forward(sched: Scheduler, plan, check=lambda seq: None) -> list:
    """A fake engine step: apply the plan as the model runner does, check each scheduled sequence's context
    (`check`), write the KV of its new tokens, then let the scheduler advance (and fork); its groups back."""
    apply_plan(sched.cache, plan)
    for seq, n in plan.scheduled:
        check(seq)
        s = seq.num_computed
        slots = torch.tensor(sched.blocks.slot_mapping(seq.seq_id, s, s + n), dtype=torch.int64)
        kv = _written(seq.token_ids[s:s + n], s).view(n, 1, 2)
        sched.cache.write(slots, kv, kv)
    return sched.update(plan)


def _scheduler(num_blocks, block_size, *, swap_blocks=0, **config):
    """A scheduler over a one-layer pool whose KV rows are (token id, position), as the fake model writes."""
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **config)
    blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=config.enable_prefix_caching)
    return Scheduler(config, blocks, PagedKVCache(1, num_blocks, block_size, 1, 2, swap_blocks=swap_blocks))


def _sequence(sched, prompt, **params):
    seq_id = sched.new_seq_id()
    seq = Sequence(seq_id, seq_id, 0, list(prompt), len(prompt),
                   SamplingParams(temperature=0, ignore_eos=True, **params))
    sched.add(seq)
    return seq


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(2, 8), block_size=st.sampled_from([1, 2, 4]), max_seqs=st.integers(1, 4),
                budget=st.integers(1, 12), preemption=st.sampled_from(["recompute", "swap"]),
                swap_blocks=st.integers(0, 6), prefix=st.booleans())
    def setup(self, num_blocks, block_size, max_seqs, budget, preemption, swap_blocks, prefix):
        self.swap_blocks = swap_blocks if preemption == "swap" else 0
        self.sched = _scheduler(num_blocks, block_size, swap_blocks=self.swap_blocks, max_num_seqs=max_seqs,
                                max_num_batched_tokens=budget, enable_prefix_caching=prefix, preemption=preemption)
        self.config, self.blocks, self.cache = self.sched.config, self.sched.blocks, self.sched.cache
        self.seqs: list[Sequence] = []

    # ---- rules -------------------------------------------------------------------------------------

    @rule(data=st.data(), prompt_len=st.integers(1, 10), max_tokens=st.integers(1, 10), share=st.booleans(),
          n=st.integers(1, 3))
    def add(self, data, prompt_len, max_tokens, share, n):
        bs, blocks = self.config.block_size, self.config.num_kv_blocks
        max_tokens = min(max_tokens, blocks * bs - prompt_len)  # as LLM.add_request: the longest request fits the pool
        if max_tokens < 1:
            return
        prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=prompt_len, max_size=prompt_len))
        if share and self.seqs:  # start with another request's tokens (prompt and output): prefix-cache hits
            other = data.draw(st.sampled_from(self.seqs)).token_ids
            prompt = (other + prompt)[:prompt_len]
        n = min(n, self.config.max_num_seqs)  # as LLM.add_request: n > max_num_seqs is rejected
        self.seqs.append(_sequence(self.sched, prompt, n=n, max_tokens=max_tokens))

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
        plan = self.sched.schedule()
        scheduled = plan.scheduled
        assert bool(scheduled) == had_work, "no progress although there is work (or work out of nothing)"
        assert sum(n for _, n in scheduled) <= self.config.max_num_batched_tokens
        assert len({s.seq_id for s, _ in scheduled}) == len(scheduled)
        for seq, n in scheduled:
            assert seq in self.sched.running and n >= 1
            assert seq.num_computed + n <= seq.num_tokens
            assert self.blocks.num_tokens(seq.seq_id) == seq.num_tokens  # blocks for every token
        bs = self.config.block_size
        groups = _forward(self.sched, plan, check=self._check_context)
        for seq, _ in scheduled:
            assert self.blocks.num_tokens(seq.seq_id) <= -(-seq.num_tokens // bs) * bs
        assert [g[0] for g in groups] == [s for s, n in scheduled if s.num_computed == s.num_tokens]
        for parent, *forks in groups:
            assert len(forks) in (0, parent.params.n - 1)
            for kid in forks:  # forked after the prompt: the same tokens, its KV shared
                assert kid.token_ids == parent.token_ids and kid.num_computed == parent.num_computed
                assert kid in self.sched.running
                self._check_context(kid)
            self.seqs += forks
            for seq in [parent, *forks]:  # "sample": siblings get different tokens, so they diverge
                seq.token_ids.append((seq.seq_id + seq.num_tokens) % VOCAB)
                if len(seq.output_ids) >= seq.params.max_tokens:
                    seq.finish_reason = "length"
                    self.sched.finish(seq)

    def _check_context(self, seq: Sequence):
        assert torch.equal(_context(self.sched, seq), _written(seq.token_ids[:seq.num_computed])), \
            f"sequence {seq.seq_id}: context KV is not what was written"

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
            if s.index == 0 and s.finish_reason == "length":  # its first token came with its forks
                assert sum(k.request_id == s.request_id for k in self.seqs) == s.params.n
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


def test_fork_after_prompt_then_copy_on_write_in_the_plan():
    """n = 3: the scheduler forks after the prompt (children share every block, run behind the parent); the
    next plan carries the copy-on-write of the shared, partly filled last block, applied only by apply_plan."""
    sched = _scheduler(8, 4, max_num_seqs=3)
    parent = _sequence(sched, [5, 6, 7, 8, 9, 10], n=3)  # 6 tokens: the second block half full
    plan = sched.schedule()
    assert plan.scheduled == [(parent, 6)] and plan.sampling == [0]
    assert plan.copies == plan.swap_out == plan.swap_in == []
    (group,) = _forward(sched, plan)
    assert group[0] is parent and [k.index for k in group[1:]] == [1, 2]
    assert sched.running == group and parent.forked and all(k.forked for k in group)
    shared = sched.blocks.block_table(parent.seq_id)
    for kid in group[1:]:
        assert kid.token_ids == parent.token_ids and kid.num_computed == 6
        assert sched.blocks.block_table(kid.seq_id) == shared
    assert all(sched.blocks.ref_count(b) == 3 for b in shared)
    for i, seq in enumerate(group):
        seq.token_ids.append(20 + i)
    plan = sched.schedule()
    assert plan.scheduled == [(seq, 1) for seq in group]
    # the first two to append leave the shared block (each to a fresh one); the last one then owns it alone
    last = shared[-1]
    assert [src for src, _ in plan.copies] == [last, last]
    dsts = [dst for _, dst in plan.copies]
    assert [sched.blocks.block_table(s.seq_id)[-1] for s in group] == dsts + [last]
    assert not sched.cache.kv[:, :, dsts].any(), "schedule() moved KV: the runner applies the plan"
    _forward(sched, plan)
    for i, seq in enumerate(group):  # prompt KV through the copies, then each one's own token
        assert torch.equal(_context(sched, seq), _written(parent.token_ids[:6] + [20 + i]))


def test_swap_out_and_in_in_the_plan():
    """Two sequences fill a 2-block pool; the next step preempts the later one by swap: the plan saves its
    block, which the scheduler has already given to the other sequence (so the save must come first).
    When blocks are free again a later plan restores it."""
    sched = _scheduler(2, 2, swap_blocks=3, preemption="swap", enable_prefix_caching=False)
    sched.cache.swap.zero_()  # the tier starts uninitialised; zeros show whether anything was copied
    a, b = _sequence(sched, [1, 2], max_tokens=3), _sequence(sched, [3, 4], max_tokens=3)
    _forward(sched, sched.schedule())
    a.token_ids.append(5)
    b.token_ids.append(6)
    (b_block,) = sched.blocks.block_table(b.seq_id)
    plan = sched.schedule()
    assert plan.scheduled == [(a, 1)] and list(sched.swapped) == [b]
    assert plan.swap_out == [(b_block, b.swap_slots[0])] and plan.swap_in == []
    assert sched.blocks.block_table(a.seq_id)[-1] == b_block  # handed out again in the same plan
    assert sched.cache.num_free_swap_slots == 2  # reserved while planning ...
    assert not sched.cache.swap.any()  # ... but nothing copied yet
    _forward(sched, plan)
    sched.finish(a)
    plan = sched.schedule()
    (slot, block), = plan.swap_in
    assert plan.scheduled == [(b, 1)] and sched.blocks.block_table(b.seq_id)[0] == block
    _forward(sched, plan)
    assert sched.cache.num_free_swap_slots == 3
    assert torch.equal(_context(sched, b), _written([3, 4, 6]))
