"""The native whole-model decode step (``kernels.decode_step``) against the layer-by-layer Python path and the
float64 model: logits by FlashAttention's rule, the cache writes, the fallbacks."""
import pytest
import torch

from conftest import assert_fa_rule
from memattn.cache import PagedKVCache
from memattn.engine.config import ModelConfig
from memattn.engine.models import StepBatch
from memattn.engine.models.llama import LlamaForCausalLM
from memattn.kernels import native
from memattn.ops.paged import paged_metadata

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler")

# 9 query heads on 3 kv heads; head_dim 64 (the kernels' unrolled width) with every bias and a sliding window
# on one layer, head_dim 40 (their generic loops) without
GEOMETRIES = {
    "hd64-bias-window": dict(head_dim=64, qkv_bias=True, o_bias=True, mlp_bias=True, windows=(None, 20, None)),
    "hd40": dict(head_dim=40, tie_word_embeddings=True),
}
BS, NB = 16, 40


def _model(geometry, dtype, seed):
    cfg = ModelConfig(arch="llama", vocab_size=211, hidden_size=72, num_layers=3, num_heads=9, num_kv_heads=3,
                      intermediate_size=112, max_position_embeddings=512, norm_eps=1e-5, **GEOMETRIES[geometry])
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():  # off-one norm weights and biases, O(1) activations
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else
                    0.3 * torch.randn_like(p) if name.endswith("bias") else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return m.to(dtype).eval()


def _batch(tokens, starts, tables, num_new, cache):
    """The StepBatch of sequences b with num_new[b] new tokens after starts[b] cached ones (slots via tables)."""
    ids, pos, slots, lens, cu = [], [], [], [], [0]
    for b, (toks, s, n) in enumerate(zip(tokens, starts, num_new)):
        ids += toks[s:s + n]
        pos += range(s, s + n)
        slots += [tables[b][j // BS] * BS + j % BS for j in range(s, s + n)]
        lens.append(s + n)
        cu.append(cu[-1] + n)
    table = torch.tensor(tables, dtype=torch.int32)
    lens_t, cu_t = torch.tensor(lens, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32)
    return StepBatch(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), table, lens_t, cu_t,
                     torch.tensor([c - 1 for c in cu[1:]]),
                     paged=paged_metadata(table, lens_t, cu_t, num_blocks=cache.num_blocks, block_size=BS))


def _run(model, dtype, tokens, prompt_lens, tables, steps, native_decode):
    """Prefill every prompt, then `steps` decode steps of all sequences at once: the decode logits."""
    cfg = model.config
    cache = PagedKVCache(cfg.num_layers, NB, BS, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    model.native_decode = native_decode
    model(_batch(tokens, [0] * len(tokens), tables, prompt_lens, cache), cache)
    out = []
    for s in range(steps):
        out.append(model(_batch(tokens, [n + s for n in prompt_lens], tables, [1] * len(tokens), cache), cache))
    return torch.stack(out), cache


@needs_native
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_matches_python_and_float64(geometry, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    prompt_lens, steps = [1, 37, 23], 3  # contexts past the 20-token window, not multiples of the block
    tokens = [torch.randint(0, 211, (n + steps,), generator=g).tolist() for n in prompt_lens]
    tables = torch.randperm(NB, generator=g)[:3 * 4].view(3, 4).tolist()
    model = _model(geometry, dtype, seed)
    ours, cache = _run(model, dtype, tokens, prompt_lens, tables, steps, True)
    naive, naive_cache = _run(model, dtype, tokens, prompt_lens, tables, steps, False)
    ref, _ = _run(_model(geometry, torch.float64, seed), torch.float64, tokens, prompt_lens, tables, steps, False)
    assert ours.dtype == torch.float32 and ours.shape == (steps, 3, 211)
    floor = 4 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
    assert_fa_rule(f"native decode step {geometry} {dtype}", ours, ref, naive, floor=floor, seed=seed)
    # the new tokens' keys and values went to their slots like the Python path's (same roundings: RoPE in
    # the dtype), and nothing else in the pool changed
    eps = torch.finfo(dtype).eps
    diff = (cache.kv.double() - naive_cache.kv.double()).abs()
    assert diff.max() <= 4 * eps * naive_cache.kv.double().abs().max(), f"seed {seed}"


@needs_native
def test_native_step_not_taken_where_it_does_not_apply(seed):
    """Prefill, more than 8 decode rows, and a model switched off run the Python path (same logits as it)."""
    g = torch.Generator().manual_seed(seed)
    model = _model("hd40", torch.float32, seed)
    calls = []
    run = type(model)._native_decode

    def counted(self, batch, cache):
        out = run(self, batch, cache)
        calls.append(out is not None)
        return out

    type(model)._native_decode = counted
    try:
        n = 10  # ten one-token sequences: a decode step of 10 rows
        tokens = [torch.randint(0, 211, (3,), generator=g).tolist() for _ in range(n)]
        tables = [[b] for b in range(n)]
        ours, _ = _run(model, torch.float32, tokens, [2] * n, tables, 1, True)
        assert calls == [False, False]  # the prefill and the 10-row step
        ref, _ = _run(model, torch.float32, tokens, [2] * n, tables, 1, False)
        assert torch.equal(ours, ref)
    finally:
        type(model)._native_decode = run


@needs_native
def test_native_step_rebinds_moved_weights(seed):
    """A weight replaced in place by another storage (``.data = ...``) is picked up, not read from its old address."""
    g = torch.Generator().manual_seed(seed)
    model = _model("hd40", torch.float32, seed)
    tokens = [torch.randint(0, 211, (6,), generator=g).tolist()]
    before, _ = _run(model, torch.float32, tokens, [5], [[3]], 1, True)
    w = model.model.layers[1].mlp.down_proj.weight
    w.data = (2 * w.data).clone()
    after, _ = _run(model, torch.float32, tokens, [5], [[3]], 1, True)
    ref, _ = _run(model, torch.float32, tokens, [5], [[3]], 1, False)
    assert not torch.equal(before, after)
    assert (after - ref).abs().max() <= 1e-4 * ref.abs().max()
