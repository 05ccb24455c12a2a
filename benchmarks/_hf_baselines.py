"""The transformers baselines of the serve workload (``benchmarks/serve.py``): ``generate`` on padded batches
and transformers' continuous batching (``generate_batch``'s manager), returning the same result dict as
``memattn.engine.workload.run_engine`` so the outputs and timings compare directly. Benchmark-only code: the
package never imports transformers for this."""
from __future__ import annotations

import time

import torch


class _FirstCall:
    """A transformers logits processor that leaves the scores alone and notes when it is first called: the
    moment the batch's first tokens are chosen (after its prefill)."""

    def __init__(self):
        self.time = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            self.time = time.perf_counter()
        return scores


def run_hf_generate(hf_model, reqs, batch_size: int = 16, progress=None) -> dict:
    """transformers ``generate`` on left-padded batches of `batch_size` (its default dynamic cache), each batch
    run to its longest output; a request's output is cut to its own length. A request's first token comes
    when its batch's first step picks its tokens (timed by a pass-through logits processor)."""
    from transformers import LogitsProcessorList

    tokens, ttft_sum, t0 = [], 0.0, time.perf_counter()
    for s in range(0, len(reqs), batch_size):
        chunk = reqs[s:s + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        first = _FirstCall()
        steps = max(m for _, m in chunk)
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                    do_sample=False, pad_token_id=0, eos_token_id=None,
                                    logits_processor=LogitsProcessorList([first]))
        ttft_sum += len(chunk) * (first.time - t0)
        for i, (_, m) in enumerate(chunk):
            tokens.append(out[i, width:width + m].tolist())
        if progress is not None:
            progress(min(s + batch_size, len(reqs)), len(reqs))
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, tokens=tokens, out_tokens=sum(map(len, tokens)), mean_ttft_s=ttft_sum / len(reqs))


def run_hf_generate_batch(hf_model, reqs, *, max_batch_tokens: int = 2048, kv_cache_memory: int = 512 << 20,
                          page_size: int = 256, progress=None) -> dict:
    """transformers' own continuous batching (the manager behind ``model.generate_batch``), greedy, EOS off.

    ``generate_batch`` itself takes one ``max_new_tokens`` for all prompts, so the requests go through its
    manager (``continuous_batching_context_manager``) with each request's own ``max_new_tokens``. Its KV pool
    is sized like ours (kv_cache_memory bytes in pages of `page_size` tokens) and its token budget per step is
    max_batch_tokens. Setting the manager up (allocating its cache) is not timed, as our LLM's construction
    is not; TTFT is its first token's timestamp minus the moment the requests were added."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    cfg = hf_model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * hf_model.dtype.itemsize
    cb = ContinuousBatchingConfig(page_size=page_size, num_blocks=max(1, kv_cache_memory // (kv_per_token * page_size)),
                                  max_batch_tokens=max_batch_tokens, max_requests_per_batch=len(reqs))
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(m for _, m in reqs), eos_token_id=-1, pad_token_id=0)
    results = {}
    with torch.no_grad(), hf_model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb, block=True, timeout=5) as manager:
        t0 = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=m, record_timestamps=True, eos_token_id=-1) for p, m in reqs]
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped early")
                continue
            if r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"transformers' continuous batching failed a request: {r.error}")
                results[r.request_id] = r
                if progress is not None:
                    progress(len(results), len(ids))
        wall = time.perf_counter() - t0
    tokens = [list(results[i].generated_tokens) for i in ids]
    ttft = sum(results[i].timestamps[0] - t0 for i in ids) / len(ids)
    return dict(wall_s=wall, tokens=tokens, out_tokens=sum(map(len, tokens)), mean_ttft_s=ttft)


__all__ = ["run_hf_generate", "run_hf_generate_batch"]
