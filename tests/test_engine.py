"""The engine against Hugging Face transformers: greedy tokens identical, logits close, every block freed.

Models are random-initialised from tiny configs (hidden 64, 2 layers, vocab 320), saved as a local HF
folder and loaded by our loader, so the loader is checked too. Reference: transformers ``generate`` run on
each prompt alone (no padding, so its numerics are those of the plain forward pass).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from memattn.engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from memattn.engine.models import PRESETS  # noqa: E402

ARCHS = ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"]
MAX_TOKENS = 12
# Logits: float32 on both sides, same weights; ours differs only in the order of the attention sums
# (paged tiles + log-sum-exp merges) and of matmuls over packed batches. Observed max |diff| ~ 3e-7 on
# logits of magnitude ~1; 1e-4 absolute leaves a wide margin yet catches any masking/position error (>1e-2).
LOGITS_ATOL = 1e-4


def _prompts():
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 320, (35,), generator=g).tolist()  # a common prefix: 2 full blocks of 16
    lens = [1, 9, 30, 47, 64]
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in lens]
    prompts += [shared + [5, 6, 7], shared + [8] * 12]
    return prompts


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    """(folder, hf model, prompts, greedy references) for one architecture."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**PRESETS[request.param])
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    folder = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(folder)
    prompts = _prompts()
    refs = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    return request.param, folder, hf, prompts, refs


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
MODES = {
    "prefix": dict(num_kv_blocks=64),
    "no-prefix": dict(num_kv_blocks=64, enable_prefix_caching=False),
    # 7 blocks hold ~1.5 of the longest requests: forces preemption; small budget forces chunked prefill
    "preempt": dict(num_kv_blocks=7, max_num_batched_tokens=24),
    "preempt-swap": dict(num_kv_blocks=7, preemption="swap", swap_space=1 << 20),
}


def assert_all_free(llm):
    stats = llm.blocks.stats()
    assert stats.used_blocks == 0 and llm.blocks.num_free_blocks == llm.blocks.num_blocks, stats
    assert not llm.scheduler.has_work()


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(model, mode):
    name, folder, _, prompts, refs = model
    llm = LLM(folder, **MODES[mode])
    outs = llm.generate(prompts, GREEDY)
    for i, (o, ref) in enumerate(zip(outs, refs)):
        assert o.outputs[0].token_ids == ref, f"{name} {mode}: prompt {i} (len {len(prompts[i])}) differs"
        assert o.outputs[0].finish_reason == "length"
    if mode.startswith("preempt"):
        assert llm.scheduler.num_preemptions > 0
    if mode == "prefix":  # a second run reuses the cached prefixes and gives the same tokens
        again = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in again] == refs
    assert_all_free(llm)


def test_logits_match_every_step(model):
    name, folder, hf, prompts, _ = model
    llm = LLM(folder, num_kv_blocks=64, max_num_batched_tokens=40)  # 40: the 47/64-token prompts go in chunks
    outs = llm.generate(prompts, GREEDY.replace(return_logits=True))
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            full = torch.tensor([p + o.outputs[0].token_ids[:-1]])
            ref = hf(full).logits[0, len(p) - 1:]
            err = (o.outputs[0].logits - ref).abs().max().item()
            assert err <= LOGITS_ATOL, f"{name}: logits differ by {err:.2e}"
    assert_all_free(llm)


def test_n_completions_share_prompt_blocks(model):
    """n=3 greedy: the children are forked after the prompt and copy-on-write the shared last block."""
    _, folder, _, prompts, refs = model
    llm = LLM(folder, num_kv_blocks=64)
    outs = llm.generate(prompts[2:4], GREEDY.replace(n=3))
    for o, ref in zip(outs, refs[2:4]):
        assert [c.token_ids for c in o.outputs] == [ref] * 3
    assert_all_free(llm)


def test_n_completions_respect_max_num_seqs(model):
    """Forked children count against max_num_seqs: a request with n = 3 waits until 3 slots are free."""
    _, folder, _, prompts, refs = model
    llm = LLM(folder, num_kv_blocks=64, max_num_seqs=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.add_request(prompts[0], GREEDY.replace(n=5))
    sizes, schedule = [], llm.scheduler.schedule

    def watched():
        out = schedule()
        sizes.append(len(llm.scheduler.running) + sum(s.params.n - 1 for s, _ in out.scheduled if not s.forked))
        return out

    llm.scheduler.schedule = watched
    outs = llm.generate(prompts[:3], GREEDY.replace(n=3))
    assert max(sizes) <= 4  # without the check, 6 (two requests admitted with one free slot)
    for o, ref in zip(outs, refs[:3]):
        assert [c.token_ids for c in o.outputs] == [ref] * 3
    assert_all_free(llm)


def test_seeded_sampling_reproducible():
    llm = LLM("tiny-llama", num_kv_blocks=64)
    p = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=123, max_tokens=10, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9]
    alone = llm.generate([prompt], p)[0].outputs[0].token_ids
    crowd = llm.generate([[3] * 20, prompt, [4] * 7], [p.replace(seed=1), p, p.replace(seed=9)])
    assert crowd[1].outputs[0].token_ids == alone
    other = llm.generate([prompt], p.replace(seed=124))[0].outputs[0].token_ids
    assert other != alone
    kids = llm.generate([prompt], p.replace(n=2))[0].outputs
    assert kids[0].token_ids == alone and kids[1].token_ids != alone  # child i draws from seed + i
    assert llm.generate([prompt], p.replace(top_k=1))[0].outputs[0].token_ids == \
        llm.generate([prompt], GREEDY.replace(max_tokens=10))[0].outputs[0].token_ids
    assert_all_free(llm)


def test_invalid_requests_are_rejected_others_finish():
    llm = LLM("tiny-llama", num_kv_blocks=16, max_model_len=100)
    good = [list(range(3, 20)), list(range(30, 40))]
    ok = llm.generate(good, GREEDY)
    prompts = [good[0], [], list(range(3, 103)), good[1], [1, 2, 999], good[0]]
    params = [GREEDY, GREEDY, GREEDY, GREEDY, GREEDY, {"temperature": -1.0}]
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in (outs[0], outs[3])] == [c.outputs[0].token_ids for c in ok]
    assert "empty prompt" in outs[1].error
    assert "max_model_len" in outs[2].error
    assert "outside the vocabulary" in outs[4].error
    assert "temperature" in outs[5].error
    assert_all_free(llm)
    with pytest.raises(ValueError, match="KV pool has only"):
        LLM("tiny-llama", num_kv_blocks=4).add_request(list(range(3, 90)), GREEDY)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(n=0),
                                 dict(max_tokens=0), dict(seed=-1), dict(stop_token_ids=[-3])])
def test_sampling_params_validated(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_engine_config_validated():
    with pytest.raises(ValueError, match="preemption"):
        LLM("tiny-llama", preemption="drop")
    with pytest.raises(ValueError, match="block_size"):
        LLM("tiny-llama", block_size=0)
    for bad in (dict(dtype="int8"), dict(dtype=torch.int32), dict(device="gpu0"), dict(seed=1.5),
                dict(num_kv_blocks=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)
    with pytest.raises(TypeError, match="dtype"):
        EngineConfig(dtype=16)
    assert EngineConfig(dtype="bfloat16", device="cpu") == EngineConfig(dtype=torch.bfloat16,
                                                                         device=torch.device("cpu"))


def test_llm_takes_engine_config():
    """LLM(model, config) and LLM(model, config=...) use the config as given; the older keywords build the
    same config; dtype, device and seed reach the model and the pool."""
    config = EngineConfig(block_size=4, num_kv_blocks=8, max_num_seqs=3, dtype="bfloat16", seed=1)
    llm = LLM("tiny-llama", config)
    assert llm.config is config and LLM("tiny-llama", config=config).config is config
    assert LLM("tiny-llama", block_size=4, num_kv_blocks=8, max_num_seqs=3, dtype=torch.bfloat16,
               seed=1).config == config
    assert llm.blocks.num_blocks == 8 and llm.blocks.block_size == 4 and llm.cache.kv.shape[3] == 4
    assert llm.cache.kv.dtype == torch.bfloat16 and next(llm.model.parameters()).dtype == torch.bfloat16
    seeded = [next(LLM("tiny-llama", num_kv_blocks=8, seed=s).model.parameters()) for s in (0, 1, 1)]
    assert not torch.equal(seeded[0], seeded[1]) and torch.equal(seeded[1], seeded[2])


def test_llm_rejects_config_and_options_together():
    config = EngineConfig(num_kv_blocks=8)
    with pytest.raises(ValueError, match="given twice.*num_kv_blocks"):
        LLM("tiny-llama", config, num_kv_blocks=16)
    with pytest.raises(TypeError, match="unknown engine option.*kv_blocks"):
        LLM("tiny-llama", kv_blocks=8)
    with pytest.raises(TypeError, match="EngineConfig"):
        LLM("tiny-llama", {"num_kv_blocks": 8})


def test_stream_and_stop_tokens():
    llm = LLM("tiny-gpt2", num_kv_blocks=32)
    prompts = [[5, 6, 7], list(range(10, 40))]
    outs = llm.generate(prompts, GREEDY)
    events = list(llm.stream(prompts, GREEDY))
    for rid, o in enumerate(outs):
        got = [e.token_id for e in events if e.request_id == events[0].request_id + rid]
        assert got == o.outputs[0].token_ids
    assert events[-1].finish_reason == "length"
    stop = outs[0].outputs[0].token_ids[3]
    cut = llm.generate([prompts[0]], GREEDY.replace(stop_token_ids=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.token_ids[-1] == stop and len(cut.token_ids) <= 4
    o = outs[1].outputs[0]
    assert o.time_to_first_token > 0 and o.time_per_output_token > 0
    assert_all_free(llm)


def test_cli_generate(capsys):
    """The deprecated --kv-blocks and the engine group's --num-kv-blocks run the same engine."""
    from memattn.cli import main

    texts = []
    for pool in (["--kv-blocks", "8"], ["--num-kv-blocks", "8", "--block-size", "16"]):
        assert main(["generate", "--random", "tiny-llama", "--prompt", "Hello", "--max-tokens", "5"] + pool) == 0
        captured = capsys.readouterr()
        assert "5 tokens" in captured.err
        texts.append(captured.out)
    assert texts[0] == texts[1]


@pytest.mark.parametrize("engine", [["--kv-mib", "1"], ["--kv-cache-memory", "1MiB", "--preemption", "swap"]])
def test_cli_bench_serve(engine, capsys):
    from memattn.cli import main

    assert main(["bench-serve", "--model", "tiny-llama", "--num-requests", "3", "--max-prompt", "40",
                 "--max-output", "20", "--max-num-batched-tokens", "32"] + engine) == 0
    out = capsys.readouterr().out
    assert "output tokens/s" in out and "mean TTFT s" in out


QUANT_MODES = {
    "prefix-n2": dict(num_kv_blocks=64),  # shared prompt blocks, forks copy-on-write their partial block
    "preempt-swap-n2": dict(num_kv_blocks=7, preemption="swap", swap_space=1 << 20),
    # re-prefill after preemption writes whole blocks at once; KIVI would then quantize a block its first run
    # read from the residual window, so recompute is compared only for the per-token formats
    "preempt-n2": dict(num_kv_blocks=7),
}


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3", "int4", "int2"])
def test_quantized_kv_cache_keeps_sharing_and_preemption_exact(kv):
    """With a quantized pool, prefix caching, n = 2 forks (copy-on-write copies codes, scales and KIVI's
    residual block), swapping and preemption give each prompt's logits of running it alone on a fresh engine
    in the same format: a block's codes depend on its contents only."""
    prompts = _prompts()[1:]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, return_logits=True)
    alone = [LLM("tiny-llama", num_kv_blocks=64, enable_prefix_caching=False, kv_cache_dtype=kv)
             .generate([p], params)[0].outputs[0] for p in prompts]
    for name, mode in QUANT_MODES.items():
        if name == "preempt-n2" and kv in ("int4", "int2"):
            continue
        llm = LLM("tiny-llama", kv_cache_dtype=kv, **mode)
        outs = llm.generate(prompts, params.replace(n=2))
        for o, ref in zip(outs, alone):
            for c in o.outputs:
                assert c.token_ids == ref.token_ids, name
                err = (c.logits - ref.logits).abs().max().item()
                assert err <= LOGITS_ATOL, f"{kv} {name}: logits differ by {err:.2e}"
        assert llm.scheduler.num_preemptions > 0 or name == "prefix-n2"
        assert_all_free(llm)


def test_quantized_kv_cache_error_grows_as_bits_shrink():
    """First-token logits of each kv_cache_dtype against the full-width pool's: int8 (steps of max / 127) is
    closest, 2-bit KIVI farthest; int8 moves them by under 1% of their size."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (9, 30, 47, 64)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, return_logits=True)
    full = [o.outputs[0].logits for o in LLM("tiny-llama", num_kv_blocks=64).generate(prompts, params)]
    err = {}
    for kv in ("int8", "fp8_e4m3", "int4", "int2"):
        outs = LLM("tiny-llama", num_kv_blocks=64, kv_cache_dtype=kv).generate(prompts, params)
        err[kv] = max((o.outputs[0].logits - f).abs().max().item() for o, f in zip(outs, full))
    assert 0 < err["int8"] < min(err["fp8_e4m3"], err["int4"]) <= max(err["fp8_e4m3"], err["int4"]) < err["int2"]
    assert err["int8"] < 0.01 * max(f.abs().max().item() for f in full), err


def test_cli_generate_kv_cache_dtype(capsys):
    from memattn.cli import main

    assert main(["generate", "--random", "tiny-llama", "--prompt", "Hello", "--max-tokens", "5",
                 "--kv-cache-dtype", "int4"]) == 0
    assert "5 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--random", "tiny-llama", "--prompt", "Hello", "--kv-cache-dtype", "int3"])
