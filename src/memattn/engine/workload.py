"""The serve workload (``benchmarks/serve.py``, ``memattn bench-serve``): seeded requests run through the engine,
throughput, TTFT and peak memory measured. The transformers baselines it is compared against live in
``benchmarks/_hf_baselines.py`` (benchmark-only code)."""
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
    """Greedy, EOS ignored, each request to its own output length. Returns wall_s, tokens (list per request),
    out_tokens, mean_ttft_s (from the request's arrival, all requests arrive at the start)."""
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params, progress=progress)
    wall = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    ttft = sum(o.outputs[0].time_to_first_token for o in outs) / len(outs)
    return dict(wall_s=wall, tokens=tokens, out_tokens=sum(map(len, tokens)), mean_ttft_s=ttft)


__all__ = ["make_requests", "run_engine"]
