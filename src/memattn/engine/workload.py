"""The serve workload (``benchmarks/serve.py``, ``memattn bench-serve``): seeded requests run through the engine
and through transformers' ``generate`` on padded batches; greedy outputs compared, throughput and TTFT timed."""
from __future__ import annotations

import time

import torch

from .config import SamplingParams
from .llm import LLM


def make_requests(num: int, seed: int = 0, prompt_lens=(16, 512), output_lens=(16, 256), vocab: int = 8000):
    """[(prompt token ids, output length)] with lengths drawn uniformly from the ranges."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(num):
        n = int(torch.randint(prompt_lens[0], prompt_lens[1] + 1, (1,), generator=g))
        m = int(torch.randint(output_lens[0], output_lens[1] + 1, (1,), generator=g))
        reqs.append((torch.randint(3, vocab, (n,), generator=g).tolist(), m))
    return reqs


def run_engine(llm: LLM, reqs, progress=None) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params, progress=progress)
    wall = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    ttft = sum(o.outputs[0].time_to_first_token for o in outs) / len(outs)
    return dict(wall_s=wall, tokens=tokens, out_tokens=sum(map(len, tokens)), mean_ttft_s=ttft)


def run_hf_generate(hf_model, reqs, batch_size: int = 16, progress=None) -> dict:
    """transformers generate on left-padded batches of `batch_size` (its default dynamic cache), each batch
    run to its longest output; a request's output is cut to its own length. TTFT: a request's first token
    arrives when its batch's first step is done (measured as one generate call with 1 new token)."""
    tokens, ttft_sum, t0 = [], 0.0, time.perf_counter()
    for s in range(0, len(reqs), batch_size):
        chunk = reqs[s:s + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        b0 = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=max(m for _, m in chunk),
                                    min_new_tokens=max(m for _, m in chunk), do_sample=False, pad_token_id=0,
                                    eos_token_id=None)
        batch_s = time.perf_counter() - b0
        steps = max(m for _, m in chunk)
        # first token of every request in the batch: after the batch's prefill, ~ (start - t0) + one step
        ttft_sum += len(chunk) * ((b0 - t0) + batch_s / steps)
        for i, (_, m) in enumerate(chunk):
            tokens.append(out[i, width:width + m].tolist())
        if progress is not None:
            progress(min(s + batch_size, len(reqs)), len(reqs))
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, tokens=tokens, out_tokens=sum(map(len, tokens)), mean_ttft_s=ttft_sum / len(reqs))


__all__ = ["make_requests", "run_engine", "run_hf_generate"]
