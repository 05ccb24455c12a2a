"""The model runner: turns a scheduled step into one packed forward pass over the paged pool."""
from __future__ import annotations

import torch

from ..cache import BlockManager, PagedKVCache
from .models import StepBatch


class ModelRunner:
    def __init__(self, model, blocks: BlockManager, cache: PagedKVCache, device="cpu"):
        self.model, self.blocks, self.cache, self.device = model, blocks, cache, torch.device(device)

    def prepare(self, scheduled) -> tuple[StepBatch, list[int]]:
        """StepBatch for [(seq, n)], and the positions in `scheduled` of the sequences that get logits
        (those whose chunk reaches their last token)."""
        ids, pos, slots, tables, lens, cu, rows, want = [], [], [], [], [], [0], [], []
        for i, (seq, n) in enumerate(scheduled):
            s = seq.num_computed
            ids.extend(seq.token_ids[s:s + n])
            pos.extend(range(s, s + n))
            slots.extend(self.blocks.slot_mapping(seq.seq_id, s, s + n))
            tables.append(self.blocks.block_table(seq.seq_id))
            lens.append(s + n)
            cu.append(cu[-1] + n)
            if s + n == seq.num_tokens:
                rows.append(cu[-1] - 1)
                want.append(i)
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        dev = self.device
        batch = StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_table=table.to(dev),
            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            logits_indices=torch.tensor(rows, dtype=torch.int64, device=dev))
        return batch, want

    def run(self, scheduled) -> tuple[torch.Tensor, list[int]]:
        """Forward the step; return float32 logits (R, vocab) and which scheduled entries they belong to."""
        batch, want = self.prepare(scheduled)
        return self.model(batch, self.cache), want


__all__ = ["ModelRunner"]
