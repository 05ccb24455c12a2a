"""Perplexity of an engine model on real text, fed as decoding would see it.

The text is Python's own reference documentation (``pydoc_text``, shipped with every Python), and a window
of tokens is one engine sequence fed in chunks (``max_num_batched_tokens``) through the engine's own step
path, so that every chunk attends to the earlier chunks through the pool's KV format (a quantized cache, a
StreamingLLM window) rather than to fresh full-precision keys of one prefill. ``benchmarks/kv.py`` and
``memattn compare-kv`` both measure quality with it.
"""
from __future__ import annotations

import math

import torch


def pydoc_text() -> str:
    """Python's reference documentation: ``pydoc_data.topics`` in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def window_losses(llm, tokens: list) -> torch.Tensor:
    """float64 (N - 1,) losses -log p(tokens[j] | tokens[:j]) for j >= 1, `tokens` fed as one sequence in the
    chunks the engine's scheduler gives (max_num_batched_tokens), through its own step path (schedule,
    apply_plan, ModelRunner.prepare, the model, update) with the logits of every row kept."""
    from .model_runner import apply_plan
    from .config import SamplingParams

    n = len(tokens)
    if n < 2:
        raise ValueError(f"window_losses needs at least 2 tokens, got {n}")
    rid = llm.add_request(tokens, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    target = torch.tensor(tokens, dtype=torch.int64)
    loss = torch.full((n,), float("nan"), dtype=torch.float64)
    try:
        while True:
            plan = llm.scheduler.schedule()
            (seq, count), = plan.scheduled
            start = seq.num_computed
            apply_plan(llm.cache, plan)
            batch = llm.runner.prepare(plan)
            batch.logits_indices = torch.arange(count)
            logp = torch.log_softmax(llm.model(batch, llm.cache).double(), -1)
            llm.scheduler.update(plan)
            m = min(count, n - 1 - start)  # rows start .. start + m - 1 predict tokens start + 1 .. start + m
            loss[start + 1:start + 1 + m] = -logp[torch.arange(m), target[start + 1:start + 1 + m]]
            if seq.num_computed == n:
                return loss[1:]
    finally:
        llm.abort(rid)


def window_nll(model, tokenizer, tokens: list, *, chunk: int = 64, block_size: int = 16, **llm_kwargs) -> float:
    """Summed negative log-likelihood (nats) of `tokens[1:]` given their prefixes, fed as one sequence in
    chunks of `chunk` tokens through a fresh ``LLM(model, ...)`` sized for them; `llm_kwargs` (e.g.
    kv_cache_dtype="int8", attention_sinks=4, streaming_window=1020) pick the cache policy."""
    from .llm import LLM

    llm = LLM(model, tokenizer=tokenizer, block_size=block_size, num_kv_blocks=-(-len(tokens) // block_size) + 2,
              max_num_batched_tokens=chunk, max_num_seqs=1, enable_prefix_caching=False, **llm_kwargs)
    return window_losses(llm, tokens).sum().item()


def perplexity(nll: float, count: int) -> float:
    """exp(mean loss) of `count` scored tokens."""
    return math.exp(nll / count)


__all__ = ["pydoc_text", "window_losses", "window_nll", "perplexity"]
