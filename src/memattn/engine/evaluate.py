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


def feed(llm, tokens: list, on_step=None) -> torch.Tensor:
    """Run `tokens` through the engine as one sequence, in the chunks its scheduler gives
    (max_num_batched_tokens), keeping every position's logits; returns float64 (N,) losses, loss[j] =
    -log p(tokens[j] | tokens[:j]) (loss[0] = nan). on_step(llm, seq) runs after each step.

    The engine's own path (``Scheduler.schedule``, ``apply_plan``, ``ModelRunner.prepare``, the model, then
    ``Scheduler.update``), with the logits of all rows instead of the last one's."""
    from .config import SamplingParams
    from .model_runner import apply_plan

    n = len(tokens)
    if n < 2:
        raise ValueError(f"feed needs at least 2 tokens, got {n}")
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
            m = min(count, n - 1 - start)  # positions start .. start + m - 1 predict start + 1 .. start + m
            loss[start + 1:start + 1 + m] = -logp[torch.arange(m), target[start + 1:start + 1 + m]]
            if on_step is not None:
                on_step(llm, seq)
            if seq.num_computed == n:
                return loss
    finally:
        llm.abort(rid)


def window_losses(llm, tokens: list) -> torch.Tensor:
    """float64 (N - 1,) losses -log p(tokens[j] | tokens[:j]) for j >= 1 (``feed`` without its nan)."""
    return feed(llm, tokens)[1:]


def window_nll(model, tokenizer, tokens: list, *, chunk: int = 64, block_size: int = 16, **llm_kwargs) -> float:
    """Summed negative log-likelihood (nats) of `tokens[1:]` given their prefixes, fed as one sequence in
    chunks of `chunk` tokens through a fresh ``LLM(model, ...)`` sized for them; `llm_kwargs` (e.g.
    kv_cache_dtype="int8", attention_sinks=4, streaming_window=1020) pick the cache policy."""
    from .llm import LLM
    from .streaming import StreamingPolicy

    blocks = -(-len(tokens) // block_size) + 2
    if llm_kwargs.get("streaming_window"):  # the blocks a streaming sequence keeps, plus one chunk's
        policy = StreamingPolicy(llm_kwargs.get("attention_sinks", 0), llm_kwargs["streaming_window"], block_size)
        blocks = max(blocks, policy.pinned_blocks + policy.window_blocks + -(-chunk // block_size) + 1)
    llm = LLM(model, tokenizer=tokenizer, block_size=block_size, num_kv_blocks=blocks,
              max_num_batched_tokens=chunk, max_num_seqs=1, enable_prefix_caching=False, **llm_kwargs)
    return window_losses(llm, tokens).sum().item()


def perplexity(nll: float, count: int) -> float:
    """exp(mean loss) of `count` scored tokens."""
    return math.exp(nll / count)


__all__ = ["pydoc_text", "feed", "window_losses", "window_nll", "perplexity"]
