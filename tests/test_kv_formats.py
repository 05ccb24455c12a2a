"""Quantized KV pools (cache/kv_formats, the quantized side of cache/paged_storage): quantization error within
each format's bound, every attention path over quantized pages against the float64 oracle run on the
dequantized cache, KIVI's residual window, copy-on-write and swapping of codes, scales and residual blocks."""
import pytest
import torch

from memattn import kernels
from memattn.cache import PagedKVCache
from memattn.cache import kv_formats
from memattn.cache.kv_formats import FORMATS, QUANTIZED, QuantizedPages
from memattn.engine import EngineConfig
from memattn.kernels import native, paged_decode, paged_native
from memattn.ops.paged import paged_attention
from memattn.reference import paged_attention as reference

from conftest import assert_fa_rule, attention_floors


def _seed():
    s = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh each run; printed on failure
    torch.manual_seed(s)
    return s


def _kv(n, hkv, d):
    """Random keys with outlier channels (as real keys have: KIVI's reason to quantize keys per channel)."""
    k = torch.randn(n, hkv, d) * (1 + 8 * (torch.rand(d) < 0.1)) + torch.randn(d)
    return k, torch.randn(n, hkv, d)


def _filled(fmt, lens, bs=16, hkv=3, d=64, num_blocks=40, chunk=7):
    """A one-layer pool in `fmt` holding sequences of `lens` tokens (written `chunk` tokens at a time, as
    chunked prefill and decode write them, so KIVI blocks fill through the residual pool), a shuffled
    block table, and the keys and values written."""
    cache = PagedKVCache(1, num_blocks, bs, hkv, d, kv_dtype=fmt, residual_blocks=len(lens) + 1)
    width = max(-(-n // bs) for n in lens)
    ids = torch.randperm(num_blocks)[:len(lens) * width].view(len(lens), width).to(torch.int32)
    written = []
    for b, n in enumerate(lens):
        k, v = _kv(n, hkv, d)
        slots = torch.tensor([int(ids[b, j // bs]) * bs + j % bs for j in range(n)])
        for a in range(0, n, chunk):
            cache.write(slots[a:a + chunk], k[a:a + chunk], v[a:a + chunk])
        written.append((slots, k, v))
    return cache, ids, written


def _bound(fmt, x, group_dim):
    """The format's stated error bound (kv_formats' docstring) for each element of x, groups along group_dim."""
    f = FORMATS[fmt]
    top = x.abs().amax(group_dim, keepdim=True)
    if fmt == "int8":
        return torch.broadcast_to(top / 254 + 1e-7 * top, x.shape)
    if fmt == "fp8_e4m3":
        return x.abs() / 16 + top / kv_formats.FP8_MAX * 2.0 ** -10
    r = x.amax(group_dim, keepdim=True) - x.amin(group_dim, keepdim=True)
    return torch.broadcast_to(r / f.levels / 2 + 2.0 ** -10 * top, x.shape)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_quantization_error_within_bound(fmt):
    seed = _seed()
    bs = 16
    cache, _, written = _filled(fmt, [64], bs=bs, chunk=64)  # whole blocks: every token quantized
    slots, k, v = written[0]
    kd = cache.key_cache(0).dequantize().reshape(-1, 3, 64)[slots]
    vd = cache.value_cache(0).dequantize().reshape(-1, 3, 64)[slots]
    kivi = FORMATS[fmt].kivi
    # KIVI keys: groups are a block's tokens per channel; everything else: a token's channels per head
    kb = _bound(fmt, k.view(-1, bs, 3, 64), 1).reshape(k.shape) if kivi else _bound(fmt, k, -1)
    for name, err, bound in (("keys", (kd - k).abs(), kb), ("values", (vd - v).abs(), _bound(fmt, v, -1))):
        assert bool((err <= bound).all()), f"{fmt} {name}: error exceeds its bound by {(err - bound).max():.3e} " \
                                           f"(seed {seed})"
        assert err.max() > 0  # it did quantize


def test_kivi_residual_window():
    """A partial block stays at full precision (exact) in the residual pool; the write of its last slot
    quantizes it and frees the residual slot; per-channel key statistics use the whole block."""
    _seed()
    cache = PagedKVCache(1, 8, 16, 2, 32, kv_dtype="int4", residual_blocks=2)
    k, v = _kv(16, 2, 32)
    slots = torch.arange(16, 32)  # block 1
    cache.write(slots[:15], k[:15], v[:15])
    assert int(cache.residual_map[0, 1]) >= 0
    kd = cache.key_cache(0).dequantize()[1]
    assert torch.equal(kd[:15], k[:15]) and torch.equal(cache.value_cache(0).dequantize()[1][:15], v[:15])
    cache.write(slots[15:], k[15:], v[15:])
    assert int(cache.residual_map[0, 1]) == -1 and len(cache._res_free[0]) == 2
    codes, scale, zero = kv_formats.quantize_asymmetric(k.unsqueeze(0), 4, 1)
    deq = codes.float() * scale.float().unsqueeze(1) + zero.float().unsqueeze(1)
    assert torch.equal(cache.key_cache(0).dequantize()[1], deq[0])


def test_kivi_residual_pool_full_evicts_least_recent():
    _seed()
    cache = PagedKVCache(1, 8, 4, 1, 8, kv_dtype="int2", residual_blocks=2)
    written = []
    for b in (0, 1, 2):  # three partial blocks, two residual slots: block 0 (written first) is quantized early
        k, v = _kv(2, 1, 8)
        cache.write(torch.tensor([4 * b, 4 * b + 1]), k, v)
        written.append(k)
    held = cache.residual_map[0, :3] >= 0
    assert held.tolist() == [False, True, True]
    # block 0 went to codes with its two unwritten (zero) slots among the per-channel statistics
    block = torch.cat([written[0], torch.zeros(2, 1, 8)])
    err = (cache.key_cache(0).dequantize()[0, :2] - written[0]).abs()
    assert bool((err <= _bound("int2", block, 0)[:2]).all())
    assert torch.equal(cache.key_cache(0).dequantize()[1, :2], written[1])  # still at full precision
    with pytest.raises(RuntimeError, match="residual pool"):  # one write with more partial blocks than slots
        cache.write(torch.tensor([20, 24, 28]), *_kv(3, 1, 8))


def _oracle_check(q, kq, vq, table, seqlens, cu=None, *, seed):
    """paged_attention over quantized pages vs the float64 reference on the dequantized cache, with the naive
    float32 reference on the same dequantized cache as the FA rule's naive run."""
    kd, vd = kq.dequantize(torch.float64), vq.dequantize(torch.float64)
    ref = reference(q.double(), kd, vd, table, seqlens, cu_seqlens_q=cu)
    naive = reference(q, kd.float(), vd.float(), table, seqlens, cu_seqlens_q=cu)
    out = paged_attention(q, kq, vq, table, seqlens, cu_seqlens_q=cu)
    floor = attention_floors(q, kd.float(), vd.float(), keys=int(seqlens.max()))
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_fa_rule("out", out, ref, naive, floor=floor["out"], seed=seed)


@pytest.fixture
def native_calls(monkeypatch):
    if not native.available():
        pytest.skip("the native paged decode kernel could not be built here (no C compiler)")
    calls = []
    real = paged_native.decode
    monkeypatch.setattr(paged_native, "decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("d", [64, 40])
def test_native_decode_matches_oracle(fmt, d, native_calls):
    """The C kernel reads the codes in place (vector widths for D = 64, the generic loop for D = 40), with
    contexts of 1 token, whole blocks and ragged ends (KIVI: partial blocks from the residual pool)."""
    seed = _seed()
    lens = [1, 16, 37, 100, 5]
    cache, table, _ = _filled(fmt, lens, d=d)
    q = torch.randn(len(lens), 1, 9, d)
    _oracle_check(q, cache.key_cache(0), cache.value_cache(0), table, torch.tensor(lens, dtype=torch.int32),
                  seed=seed)
    assert native_calls
    if FORMATS[fmt].kivi:
        assert int((cache.residual_map >= 0).sum()) == 4  # the residual blocks were read (lens 1, 37, 100, 5)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_gather_decode_and_chunked_prefill_match_oracle(fmt):
    """The torch paths (blocks dequantized per gathered tile): the gather decode schedule, and packed
    chunked-prefill queries of several lengths with a decode row among them."""
    seed = _seed()
    lens = [1, 16, 37, 100, 5]
    cache, table, _ = _filled(fmt, lens, d=40)
    kq, vq = cache.key_cache(0), cache.value_cache(0)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    with kernels.use_backend(decode="gather"):
        _oracle_check(torch.randn(len(lens), 1, 6, 40), kq, vq, table, seqlens, seed=seed)
    q_lens = [1, 9, 20, 64, 5]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    _oracle_check(torch.randn(sum(q_lens), 6, 40), kq, vq, table, seqlens, cu, seed=seed)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_copy_on_write_and_swap_move_codes_scales_and_residual(fmt):
    _seed()
    cache = PagedKVCache(2, 8, 4, 2, 8, kv_dtype=fmt, residual_blocks=4, swap_blocks=4)
    for layer in (0, 1):
        cache.write(torch.arange(0, 7), *_kv(7, 2, 8), layer=layer)  # block 0 full, block 1 partial (3 tokens)
    before = [(cache.key_cache(l).dequantize().clone(), cache.value_cache(l).dequantize().clone()) for l in (0, 1)]
    cache.copy_blocks([(1, 5), (0, 6)])
    for l in (0, 1):
        for side, full in zip((cache.key_cache(l), cache.value_cache(l)), before[l]):
            d = side.dequantize()
            assert torch.equal(d[5, :3], full[1, :3]) and torch.equal(d[6], full[0])
    if FORMATS[fmt].kivi:  # the copy got a residual slot of its own: the source's next token does not reach it
        assert int(cache.residual_map[0, 5]) not in (-1, int(cache.residual_map[0, 1]))
    slots = cache.swap_out([1, 0])
    cache.write(torch.arange(4, 8), *_kv(4, 2, 8))  # the blocks are reused meanwhile
    cache.swap_in(slots, [2, 3])
    for l in (0, 1):
        for side, full in zip((cache.key_cache(l), cache.value_cache(l)), before[l]):
            d = side.dequantize()
            assert torch.equal(d[2, :3], full[1, :3]) and torch.equal(d[3], full[0])
    if FORMATS[fmt].kivi:
        assert int(cache.residual_map[1, 2]) >= 0  # the partial block came back with its residual copy


def test_bytes_per_token_match_the_pool_and_the_targets():
    for fmt in FORMATS:
        cache = PagedKVCache(3, 4, 16, 3, 64, kv_dtype=fmt)
        per_token = kv_formats.bytes_per_token(fmt, num_layers=3, kv_heads=3, head_dim=64, block_size=16)
        stored = sum(t.numel() * t.element_size() for t in (cache.kv, *cache.meta))
        assert stored == per_token * 4 * 16 == cache.bytes_per_block * 4
    full = kv_formats.bytes_per_token("auto", num_layers=1, kv_heads=3, head_dim=64)
    ratio = {f: kv_formats.bytes_per_token(f, num_layers=1, kv_heads=3, head_dim=64) / full for f in QUANTIZED}
    assert ratio["int8"] <= 0.27 and ratio["fp8_e4m3"] <= 0.27 and ratio["int4"] <= 0.2 and ratio["int2"] < ratio["int4"]


def test_bad_kv_dtype_is_rejected():
    for bad in ("int3", "float8", None, torch.int8):
        with pytest.raises(ValueError, match="kv_dtype must be one of"):
            PagedKVCache(1, 4, 16, 2, 64, kv_dtype=bad)
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
            EngineConfig(kv_cache_dtype=bad)
    with pytest.raises(ValueError, match="head_dim 6 must be a multiple of 4"):
        PagedKVCache(1, 4, 16, 2, 6, kv_dtype="int2")
    with pytest.raises(ValueError, match="residual_blocks"):
        PagedKVCache(1, 4, 16, 2, 8, kv_dtype="int4", residual_blocks=0)
    cache = PagedKVCache(1, 4, 16, 2, 8, kv_dtype="int8")
    q = torch.randn(1, 1, 2, 8)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(TypeError, match="one quantized pool"):
        paged_attention(q, cache.key_cache(0), torch.zeros(4, 16, 2, 8), table, lens)
    with pytest.raises(ValueError, match="pool decode kernel reads full-width"):
        from memattn.kernels import paged_pool
        paged_pool.decode(q[:, 0], cache.key_cache(0), cache.value_cache(0), table,
                          paged_decode.visible_ranges(lens), scale=0.3)
    assert isinstance(cache.key_cache(0), QuantizedPages)
