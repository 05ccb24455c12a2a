"""The model runner: applies a step plan's block moves, then runs it as one packed forward pass over the
paged pool."""
from __future__ import annotations

import torch

from ..cache import BlockManager, PagedKVCache
from ..ops.paged import paged_metadata
from .models import StepBatch
from .scheduler import StepPlan
from .streaming import StreamingStep


def apply_plan(cache: PagedKVCache, plan: StepPlan) -> None:
    """Move the KV the plan asks for: swap-outs, swap-ins, then copy-on-write copies (``StepPlan`` says why
    in this order). One call each for the whole step."""
    if plan.swap_out:
        blocks, slots = zip(*plan.swap_out)
        cache.swap_out(blocks, slots)
    if plan.swap_in:
        slots, blocks = zip(*plan.swap_in)
        cache.swap_in(slots, blocks)
    cache.copy_blocks(plan.copies)


class ModelRunner:
    """streaming: the engine's ``StreamingPolicy`` or None (``engine.streaming``)."""

    def __init__(self, model, blocks: BlockManager, cache: PagedKVCache, device="cpu", streaming=None):
        self.model, self.blocks, self.cache, self.device = model, blocks, cache, torch.device(device)
        self.streaming = streaming

    def _window_table(self, seq_id, table: list) -> tuple[list, int]:
        """(block-table row, first logical token it covers) of the window part's attention: the whole table
        until the first eviction, then the blocks after the pinned (sink) ones, whose first logical block is
        pinned + evicted. The window is relative (window_size), so shifting a row's positions changes nothing."""
        evicted = self.blocks.num_evicted(seq_id)
        if not evicted:
            return table, 0
        pinned = self.streaming.pinned_blocks
        return table[pinned:], (pinned + evicted) * self.blocks.block_size

    def _streaming_step(self, plan: StepPlan, tables: list, positions: list, rows: list):
        """The step's ``StreamingStep`` (sink part metadata), or None without sinks."""
        policy, bs = self.streaming, self.blocks.block_size
        if policy is None or not policy.sinks:
            return None
        dev = self.device
        slots = torch.tensor([[t[j // bs] * bs + j % bs for j in range(policy.sinks)] for t in tables],
                             dtype=torch.int64, device=dev)
        t = torch.tensor(positions, dtype=torch.int64, device=dev)
        return StreamingStep(policy.cache_position(t), slots, torch.tensor(rows, dtype=torch.int64, device=dev),
                             policy.sink_cutoff(t), policy.window)

    def prepare(self, plan: StepPlan) -> StepBatch:
        """The step's metadata, built once for every layer: the packed new tokens of ``plan.scheduled``,
        with logits rows for ``plan.sampling`` (each sequence's last new token)."""
        ids, pos, slots, tables, lens, cu = [], [], [], [], [], [0]
        full_tables, seq_rows = [], []
        for b, (seq, n) in enumerate(plan.scheduled):
            s = seq.num_computed
            ids.extend(seq.token_ids[s:s + n])
            pos.extend(range(s, s + n))
            slots.extend(self.blocks.slot_mapping(seq.seq_id, s, s + n))
            table, first = self.blocks.block_table(seq.seq_id), 0
            if self.streaming is not None:
                full_tables.append(table)
                seq_rows.extend([b] * n)
                table, first = self._window_table(seq.seq_id, table)
            tables.append(table)
            lens.append(s + n - first)
            cu.append(cu[-1] + n)
        rows = [cu[i + 1] - 1 for i in plan.sampling]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        dev = self.device
        block_table = table.to(dev)
        cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
        cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=dev)
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_table=block_table, cache_seqlens=cache_seqlens, cu_seqlens_q=cu_seqlens_q,
            logits_indices=torch.tensor(rows, dtype=torch.int64, device=dev),
            paged=paged_metadata(block_table, cache_seqlens, cu_seqlens_q, num_blocks=self.cache.num_blocks,
                                 block_size=self.cache.block_size),
            window=None if self.streaming is None else self.streaming.window,
            streaming=self._streaming_step(plan, full_tables, pos, seq_rows))

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Apply the plan's block moves, forward the step; return float32 logits (len(plan.sampling), vocab)."""
        apply_plan(self.cache, plan)
        return self.model(self.prepare(plan), self.cache)


__all__ = ["ModelRunner", "apply_plan"]
