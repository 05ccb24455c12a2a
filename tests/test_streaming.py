"""StreamingLLM in the engine (``engine/streaming``, ``BlockManager.evict``, the scheduler's chunk-wise
allocation): a small random llama model with sinks + window against a float64 reference computation of the
same policy written from scratch (each query attends to the first S tokens and the last W, with positions
within the cache, every key rotated anew for every query), used blocks flat, no leak, bad values refused."""
from __future__ import annotations

import pytest
import torch

from memattn.cache import BlockManager
from memattn.engine import LLM, EngineConfig, SamplingParams
from memattn.engine.streaming import StreamingPolicy

MODEL = "tiny-llama"  # hidden 64, 2 layers, 4 query heads, 2 kv heads


def _rope(x, pos, inv_freq):
    """x (..., D) rotated at positions pos (broadcast to x's leading dims), rotate-half, float64 angles."""
    ang = pos.to(torch.float64).unsqueeze(-1) * inv_freq.to(torch.float64)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _rms(x, w, eps):
    """Llama's RMSNorm as the model defines it (transformers too): normalised in float32, whatever the dtype."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).double()


# The float64 engine and this reference differ by the float32 rounding of the normalised activations (the
# model's RMSNorm, above), which the two see from inputs that differ in their last float64 bits: ~1e-7 of
# the logits. A wrong key set or a wrong position moves them by ~1e-2.
LOGITS_RTOL = 1e-5


def reference_logits(model, tokens, sinks, window):
    """Logits (T, vocab) of every position of `tokens` under StreamingLLM, in float64, the obvious way:
    query t sees keys V(t) = [0, sinks) U [t - window + 1, t]; the cache of query t is V(t) in order, and
    the c-th key of it sits at position c (the query at position len(V(t)) - 1)."""
    cfg = model.config
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = {k: t.detach().double() for k, t in model.state_dict().items()}
    inv = model.inv_freq.double()
    n = len(tokens)
    x = p["model.embed_tokens.weight"][torch.tensor(tokens)]
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}."
        a = _rms(x, p[pre + "input_layernorm.weight"], cfg.norm_eps)
        qkv = a @ p[pre + "self_attn.qkv_proj.weight"].T
        q = qkv[:, :h * d].view(n, h, d)
        k = qkv[:, h * d:(h + hkv) * d].view(n, hkv, d).repeat_interleave(h // hkv, 1)
        v = qkv[:, (h + hkv) * d:].view(n, hkv, d).repeat_interleave(h // hkv, 1)
        out = torch.empty(n, h, d, dtype=torch.float64)
        for t in range(n):
            keys = sorted(set(range(min(sinks, t + 1))) | set(range(max(0, t - window + 1), t + 1)))
            c = torch.arange(len(keys))
            kt = _rope(k[keys], c.view(-1, 1), inv)  # (len, H, D)
            qt = _rope(q[t], torch.tensor(len(keys) - 1), inv)  # (H, D)
            s = torch.einsum("hd,khd->hk", qt, kt) * d ** -0.5
            out[t] = torch.einsum("hk,khd->hd", s.softmax(-1), v[keys])
        x = x + out.reshape(n, h * d) @ p[pre + "self_attn.o_proj.weight"].T
        m = _rms(x, p[pre + "post_attention_layernorm.weight"], cfg.norm_eps)
        gate, up = (m @ p[pre + "mlp.gate_up_proj.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ p[pre + "mlp.down_proj.weight"].T
    x = _rms(x, p["model.norm.weight"], cfg.norm_eps)
    return x @ p["lm_head.weight"].T


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()


def _run(llm, prompts, max_tokens):
    """Generate greedily step by step; returns (outputs in order, used blocks after each step, and per sequence
    the blocks it held after each step it ran)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, return_logits=True)
    rids = [llm.add_request(p, params) for p in prompts]
    used, held = [], {}
    while llm.has_unfinished():
        llm.step()
        used.append(llm.blocks.stats().used_blocks)
        for seq in llm.scheduler.running:
            held.setdefault(seq.seq_id, []).append(len(llm.blocks.block_table(seq.seq_id)))
    outs = [llm._output(r) for r in rids]
    for r in rids:
        llm.abort(r)
    return outs, used, held


@pytest.mark.parametrize("sinks,window,bs,budget", [(4, 20, 8, 13), (0, 17, 16, 2048), (3, 9, 4, 64)],
                         ids=["sinks4-W20-bs8-chunks13", "window-alone", "sinks3-W9-bs4"])
def test_matches_float64_reference_and_blocks_stay_flat(sinks, window, bs, budget):
    llm = LLM(MODEL, dtype="float64", attention_sinks=sinks, streaming_window=window, block_size=bs,
              num_kv_blocks=64, max_num_batched_tokens=budget)
    prompts = [_prompt(45, 1), _prompt(7, 2)]  # one prefills past its window (in chunks), one fills it decoding
    max_tokens = 40
    outs, used, held = _run(llm, prompts, max_tokens)
    for prompt, out in zip(prompts, outs):
        o = out.outputs[0]
        tokens = prompt + o.token_ids
        ref = reference_logits(llm.model, tokens[:-1], sinks, window)[len(prompt) - 1:]
        ours = o.logits.double()
        err = (ours - ref).abs().max().item()
        assert err < LOGITS_RTOL * max(1.0, ref.abs().max().item()), f"logits differ by {err:.3e}"
    policy = llm.streaming
    per_seq = policy.pinned_blocks + policy.window_blocks
    # once a sequence's window has filled it holds exactly pinned + window blocks after every step
    for counts in held.values():
        first = counts.index(per_seq)
        assert first <= len(counts) - 10 and all(c == per_seq for c in counts[first:]), (counts, per_seq)
    assert len(held) == 2 and max(used) <= 2 * per_seq
    stats = llm.blocks.stats()
    assert stats.used_blocks == 0 and llm.blocks.num_free_blocks == llm.blocks.num_blocks  # no leak


def test_not_bound_by_max_model_len_and_admission_does_not_reserve_the_whole_length():
    # 12 blocks of 8 tokens = 96 slots; the request grows to 300 tokens, past max_model_len 64
    llm = LLM(MODEL, attention_sinks=2, streaming_window=24, block_size=8, num_kv_blocks=12, max_model_len=64,
              max_num_batched_tokens=16)
    out = llm.generate([_prompt(150, 3)], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))[0]
    assert out.error is None and len(out.outputs[0].token_ids) == 150 and out.outputs[0].finish_reason == "length"
    assert llm.blocks.stats().used_blocks == 0


def test_abort_and_preemption_free_every_block():
    # a pool of two streaming sequences' worth at most: the third request preempts (recompute) or waits
    llm = LLM(MODEL, dtype="float64", attention_sinks=4, streaming_window=20, block_size=8, num_kv_blocks=13,
              max_num_batched_tokens=8)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, return_logits=True)
    prompts = [_prompt(30, s) for s in (4, 5, 6)]
    rids = [llm.add_request(p, params) for p in prompts]
    for _ in range(25):
        llm.step()
    llm.abort(rids[1])
    while llm.has_unfinished():
        llm.step()
    for r in (rids[0], rids[2]):  # the survivors are still exact (recompute re-prefills under the policy)
        o = llm._output(r).outputs[0]
        ref = reference_logits(llm.model, (prompts[rids.index(r)] + o.token_ids)[:-1], 4, 20)[29:]
        assert (o.logits.double() - ref).abs().max().item() < LOGITS_RTOL * max(1.0, ref.abs().max().item())
    assert llm.scheduler.num_preemptions > 0
    assert llm.blocks.stats().used_blocks == 0 and llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_forks_share_then_evict_their_own_blocks():
    llm = LLM(MODEL, attention_sinks=4, streaming_window=16, block_size=4, num_kv_blocks=64)
    out = llm.generate([_prompt(10, 7)], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=40,
                                                         ignore_eos=True))[0]
    assert [len(o.token_ids) for o in out.outputs] == [40] * 3
    assert llm.blocks.stats().used_blocks == 0 and llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_prefix_caching_is_off_for_streaming():
    llm = LLM(MODEL, attention_sinks=4, streaming_window=16, block_size=4, num_kv_blocks=64)
    assert not llm.blocks.enable_prefix_caching
    p = _prompt(40, 8)
    llm.generate([p, p], SamplingParams(temperature=0, max_tokens=4))
    assert llm.prefix_hits == 0


def test_block_manager_evict_keeps_logical_positions():
    bm = BlockManager(10, 4, enable_prefix_caching=False)
    bm.allocate("a", list(range(18)))  # 5 blocks, the last partial
    table = bm.block_table("a")
    assert bm.evict("a", 12, pinned=1) == 2  # blocks 1 and 2 go; block 0 (pinned), 3, 4 stay
    assert bm.block_table("a") == [table[0], table[3], table[4]] and bm.num_evicted("a") == 2
    assert bm.slot_mapping("a", 12, 18) == [table[3] * 4 + i for i in range(4)] + [table[4] * 4, table[4] * 4 + 1]
    assert bm.slot_mapping("a", 0, 2) == [table[0] * 4, table[0] * 4 + 1]
    with pytest.raises(ValueError, match="evicted"):
        bm.slot_mapping("a", 5, 6)
    assert bm.num_free_blocks == 7 and bm.stats().tokens == 4 + 4 + 2
    bm.append_slots("a", [0, 0, 0])  # 21 tokens: one more block
    assert len(bm.block_table("a")) == 4 and bm.evict("a", 100, pinned=1) == 2  # never the last block
    bm.free("a")
    assert bm.num_free_blocks == 10


@pytest.mark.parametrize("options,match", [
    (dict(attention_sinks=4), "needs a streaming_window"),
    (dict(attention_sinks=-1, streaming_window=8), "attention_sinks must be an int >= 0"),
    (dict(streaming_window=0), "streaming_window must be an int >= 1"),
    (dict(streaming_window=8, preemption="swap"), "recompute"),
    (dict(streaming_window=1000, num_kv_blocks=8), "the KV pool has only 8"),
])
def test_bad_values(options, match):
    with pytest.raises(ValueError, match=match):
        LLM(MODEL, **options)


def test_models_it_cannot_stream():
    with pytest.raises(ValueError, match="rotary"):
        LLM("tiny-gpt2", streaming_window=16)
    with pytest.raises(ValueError, match="sliding window of its own"):
        LLM("tiny-mistral", streaming_window=16)


def test_cli_flags():
    import argparse

    from memattn.engine.args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    cfg = engine_config_from_args(parser.parse_args(["--attention-sinks", "4", "--streaming-window", "1020"]))
    assert cfg == EngineConfig(attention_sinks=4, streaming_window=1020)
    assert cfg.streaming_policy() == StreamingPolicy(4, 1020, 16)
    with pytest.raises(SystemExit):
        parser.parse_args(["--streaming-window", "0"])


def test_every_row_of_chunked_prefill_matches_the_reference():
    """benchmarks/kv_streaming.py's ``feed`` (the engine's path, all rows' logits): every position's loss under
    sinks + window, chunks crossing the window's first fill and the sinks' cutoff, against the reference."""
    import math
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from kv_streaming import feed, ppl

    tokens = _prompt(70, 9)
    for sinks, window in ((3, 11), (0, 10)):
        llm = LLM(MODEL, dtype="float64", attention_sinks=sinks, streaming_window=window, block_size=4,
                  num_kv_blocks=32, max_num_batched_tokens=9)
        loss = feed(llm, tokens)
        logp = torch.log_softmax(reference_logits(llm.model, tokens, sinks, window), -1)
        ref = -logp[torch.arange(69), torch.tensor(tokens[1:])]
        assert math.isnan(loss[0].item())
        assert (loss[1:] - ref).abs().max().item() < LOGITS_RTOL, (sinks, window)
        assert math.isclose(ppl(loss, 1, 70), math.exp(ref.mean().item()), rel_tol=1e-6)
        assert llm.blocks.stats().used_blocks == 0


@pytest.mark.parametrize("sinks", [4, 0])
def test_float32_through_the_native_decode_kernel(sinks):
    """float32: decode steps run the native C kernel (the window part's shifted tables, and the bound
    batch-1 step without sinks); against the float64 reference of the same tokens, test_engine's logits bound
    (1e-4 absolute: float32 rounding of the sums is ~1e-6 here; a wrong key or position moves logits ~1e-2)."""
    from memattn import kernels

    llm = LLM(MODEL, attention_sinks=sinks, streaming_window=20, block_size=8, num_kv_blocks=64,
              max_num_batched_tokens=16)
    prompt = _prompt(30, 10)
    with kernels.use_backend(decode="native"):
        outs, _, _ = _run(llm, [prompt], 30)
    o = outs[0].outputs[0]
    ref = reference_logits(llm.model, (prompt + o.token_ids)[:-1], sinks, 20)[29:]
    assert (o.logits.double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("fmt,bound", [("int8", 0.01), ("int4", 0.06)])
def test_quantized_kv_cache(fmt, bound):
    """Sinks are read from a quantized pool through its own dequantization (QuantizedPages.index_select):
    against the float64 reference of the same tokens on full-width keys, the logits move only by the format's
    quantization error (measured: int8 1.8e-3, KIVI int4 2.7e-2 of the largest logit; sinks read one slot
    off move them by 0.09), blocks stay flat and none leaks."""
    llm = LLM(MODEL, attention_sinks=4, streaming_window=20, block_size=8, num_kv_blocks=64,
              max_num_batched_tokens=16, kv_cache_dtype=fmt)
    prompt = _prompt(30, 11)
    outs, _, held = _run(llm, [prompt], 30)
    o = outs[0].outputs[0]
    ref = reference_logits(llm.model, (prompt + o.token_ids)[:-1], 4, 20)[29:]
    err = (o.logits.double() - ref).abs().max().item()
    assert err < bound * ref.abs().max().item(), f"{fmt}: logits differ by {err:.3e}"
    per_seq = llm.streaming.pinned_blocks + llm.streaming.window_blocks
    counts, = held.values()
    assert counts[-1] == per_seq and llm.blocks.stats().used_blocks == 0
