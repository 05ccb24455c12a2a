"""The batch-1 decode fast path: the bound decode step, the fused elementwise steps, the sampler's draw."""
import pytest
import torch
import torch.nn.functional as F

from memattn.engine.sampler import draw
from memattn.kernels import gemv, native
from memattn.ops.paged import paged_attention, paged_decode_step, paged_metadata

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [(-1, -1), (20, 0)])
def test_bound_decode_step_matches_paged_attention(dtype, window):
    seed = 7
    g = torch.Generator().manual_seed(seed)
    nb, bs, hkv, h, d = 40, 16, 3, 9, 64
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    lens = torch.tensor([147, 1, 33], dtype=torch.int32)
    table = torch.randperm(nb, generator=g)[:30].view(3, 10).to(torch.int32)
    cu = torch.arange(4, dtype=torch.int32)
    md = paged_metadata(table, lens, cu, num_blocks=nb, block_size=bs)
    q = torch.randn(3, h, d, generator=g).to(dtype)
    step = paged_decode_step(q, kc, vc, md, softmax_scale=0.125, window_size=window)
    assert step is not None
    for layer in range(2):  # the same bound step, other q and caches of the same shapes
        q = torch.randn(3, h, d, generator=g).to(dtype)
        ref = paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu, softmax_scale=0.125, window_size=window,
                              metadata=md)
        out = step(q, kc, vc)
        assert out.dtype == dtype and out.shape == q.shape
        assert torch.equal(out, ref), f"seed {seed}"
    with pytest.raises(ValueError):
        step(q[:2], kc, vc)
    with pytest.raises(ValueError):
        step(q, kc[:5], vc[:5])


def test_bound_decode_step_declines_prefill():
    nb, bs = 8, 16
    kc = torch.randn(nb, bs, 1, 32)
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    lens = torch.tensor([20, 5], dtype=torch.int32)
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)  # the first sequence has 3 queries
    md = paged_metadata(table, lens, cu, num_blocks=nb, block_size=bs)
    assert paged_decode_step(torch.randn(4, 2, 32), kc, kc.clone(), md) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 40])  # 40 rows: the PyTorch path
def test_add_rms_norm_and_silu_mul(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g).to(dtype)
    delta = torch.randn(rows, 576, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(576, generator=g)).to(dtype)
    ref_x = x + delta
    xf = ref_x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out = gemv.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(x, ref_x)  # the residual updated in place, rounded like x + delta
    ulp = torch.finfo(dtype).eps
    assert (out.double() - ref.double()).abs().max() <= 2 * ulp * ref.double().abs().max()
    gu = torch.randn(rows, 2 * 1536, generator=g).to(dtype)
    gate, up = gu.split([1536, 1536], -1)
    ref = F.silu(gate) * up
    got = gemv.silu_mul(gu)
    assert (got.double() - ref.double()).abs().max() <= 2 * ulp * ref.double().abs().max()


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.3])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(4000)]), minlength=5).float() / 4000
    assert counts[0] == 0 and counts[3] == 0  # never a zero-probability token
    assert (counts - probs).abs().max() < 0.03
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw(probs, g1) for _ in range(20)] == [draw(probs, g2) for _ in range(20)]
    assert draw(torch.tensor([0.0, 0.0, 2.0])) == 2  # unnormalised weights
