"""paged_attention against the token-by-token gather reference (float64 oracle, FlashAttention's error rule)."""
import pytest
import torch

import memattn
from memattn.cache import BlockManager, PagedKVCache
from memattn import kernels
from memattn.kernels import merge, native, paged_decode, paged_native, paged_pool
from memattn.ops import paged
from memattn.ops.paged import paged_attention, paged_attention_reference

from conftest import amax, assert_fa_rule, attention_floors


def _seed():
    s = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh each run; printed on failure
    torch.manual_seed(s)
    return s


def _problem(lens, q_lens, bs, h, hkv, d, *, packed):
    """Random float64 caches, a block table of random (repeating) ids, queries for each sequence."""
    max_blocks = max(-(-n // bs) for n in lens) + 2
    num_blocks = max(4, len(lens) * max_blocks // 2)  # fewer blocks than entries: ids repeat
    kc = torch.randn(num_blocks, bs, hkv, d, dtype=torch.float64)
    vc = torch.randn(num_blocks, bs, hkv, d, dtype=torch.float64)
    table = torch.randint(0, num_blocks, (len(lens), max_blocks), dtype=torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    if packed:
        q = torch.randn(sum(q_lens), h, d, dtype=torch.float64)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    else:
        q = torch.randn(len(lens), q_lens[0], h, d, dtype=torch.float64)
        cu = None
    return q, kc, vc, table, seqlens, cu


def _check(q, kc, vc, table, seqlens, cu, dtype=torch.float32, **kw):
    """Both outputs and lse: dtype path within 2x the naive dtype error + the derived floor; float64 path
    within the float64 floor (conftest.attention_floors)."""
    seed = torch.initial_seed()
    slopes = kw.get("alibi_slopes")
    # ALiBi adds at most max(slope) * (longest context) to a score
    floor_kw = dict(scale=kw.get("softmax_scale"), keys=int(seqlens.max()),
                    bias=0.0 if slopes is None else amax(slopes) * int(seqlens.max()))
    ref, ref_lse = paged_attention_reference(q, kc, vc, table, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
    out64, lse64 = paged_attention(q, kc, vc, table, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
    floor64 = attention_floors(q, kc, vc, **floor_kw)
    assert_fa_rule("float64 out", out64, ref, None, floor=floor64["out_alone"], seed=seed)
    assert_fa_rule("float64 lse", lse64, ref_lse, None, floor=floor64["lse"], seed=seed)
    args = [t.to(dtype) for t in (q, kc, vc)]
    kw["alibi_slopes"] = None if slopes is None else slopes.float()
    out, lse = paged_attention(*args, table, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
    naive, naive_lse = paged_attention_reference(*args, table, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    floor = attention_floors(*args, **floor_kw)
    assert_fa_rule(f"{dtype} out", out, ref, naive, floor=floor["out"], seed=seed)
    assert lse.dtype == torch.float32
    assert_fa_rule(f"{dtype} lse", lse, ref_lse, naive_lse, floor=floor["lse"], seed=seed)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("h,hkv", [(8, 1), (4, 4)])
def test_decode(bs, d, h, hkv):
    _seed()
    lens = [1, bs, 3 * bs, 2 * bs + 5, 97]
    _check(*_problem(lens, [1], bs, h, hkv, d, packed=False))


@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("h,hkv", [(8, 1), (3, 3)])
def test_chunked_prefill(bs, h, hkv):
    _seed()
    # a fresh prompt (Lq = L), chunks continuing a cached prefix, a decode row, an idle row
    lens, q_lens = [40, 2 * bs, 70, 33, 5], [40, bs, 23, 1, 0]
    _check(*_problem(lens, q_lens, bs, h, hkv, 64, packed=True))


def _with_slopes(options, batch, heads):
    """options with alibi_slopes "heads" / "batch" replaced by random float64 slopes (heads,) / (batch, heads)."""
    kw = dict(options)
    if kw.get("alibi_slopes") == "heads":
        kw["alibi_slopes"] = torch.rand(heads, dtype=torch.float64)
    elif kw.get("alibi_slopes") == "batch":
        kw["alibi_slopes"] = torch.rand(batch, heads, dtype=torch.float64)
    return kw


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("options", [
    dict(window_size=(5, 0)),
    dict(window_size=(2 * 16, 0)),
    dict(alibi_slopes="heads"),
    dict(alibi_slopes="batch", window_size=(9, 0)),
    dict(causal=False, window_size=(4, 3)),
    dict(softcap=3.0),
    dict(softmax_scale=0.3),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options(packed, options):
    _seed()
    lens, q_lens = [1, 16, 50, 81], ([1, 7, 16, 30] if packed else [1])
    q, kc, vc, table, seqlens, cu = _problem(lens, q_lens, 16, 8, 2, 64, packed=packed)
    _check(q, kc, vc, table, seqlens, cu, **_with_slopes(options, len(lens), 8))


def test_uniform_multi_query_and_bfloat16():
    _seed()
    _check(*_problem([6, 16, 40], [6], 16, 4, 2, 64, packed=False))
    _check(*_problem([1, 16, 40], [1], 16, 4, 2, 64, packed=False), dtype=torch.bfloat16)


def test_decode_scratch_is_bounded(monkeypatch):
    """A one-block scratch budget gives the same answer in many steps (the schedule, not the budget, is exact)."""
    _seed()
    q, kc, vc, table, seqlens, cu = _problem([300, 17, 1], [1], 16, 4, 4, 64, packed=False)
    full = paged_attention(q, kc, vc, table, seqlens)
    monkeypatch.setattr(paged, "DECODE_SCRATCH_BYTES", 1)
    monkeypatch.setattr(paged, "PREFILL_BLOCK_K", 24)
    with kernels.use_backend(decode="gather"):  # the gather schedule has the scratch
        steps = paged_attention(q, kc, vc, table, seqlens)
    assert (steps - full).abs().max() <= 1e-12
    q2, kc2, vc2, table2, seqlens2, cu2 = _problem([90, 33], [90, 20], 8, 4, 2, 64, packed=True)
    _check(q2, kc2, vc2, table2, seqlens2, cu2)


def test_matches_dense_attention_through_block_manager():
    """The pieces together: allocate, write through slot mappings, fork + copy-on-write, attend."""
    _seed()
    bm, bs, hkv, h, d = BlockManager(40, 8), 8, 2, 4, 32
    store = PagedKVCache(1, 40, bs, hkv, d, dtype=torch.float64)
    dense = {}

    def append(seq, n):
        k, v = torch.randn(n, hkv, d, dtype=torch.float64), torch.randn(n, hkv, d, dtype=torch.float64)
        start = bm.num_tokens(seq) if seq in bm else 0
        if seq in bm:
            store.copy_blocks(bm.append_slots(seq, range(n)))
        else:
            bm.allocate(seq, range(n))
        store.write(torch.tensor(bm.slot_mapping(seq, start, start + n)), k, v)
        dk, dv = dense.get(seq, (k[:0], v[:0]))
        dense[seq] = (torch.cat([dk, k]), torch.cat([dv, v]))

    append("a", 13)
    bm.fork("a", "b")
    dense["b"] = dense["a"]
    append("b", 3)  # partial shared block: copy-on-write
    append("a", 1)
    seqs = ["a", "b"]
    width = max(len(bm.block_table(s)) for s in seqs)
    table = torch.tensor([bm.block_table(s) + [0] * (width - len(bm.block_table(s))) for s in seqs], dtype=torch.int32)
    lens = torch.tensor([bm.num_tokens(s) for s in seqs], dtype=torch.int32)
    q = torch.randn(2, 1, h, d, dtype=torch.float64)
    out = memattn.paged_attention(q, store.key_cache(0), store.value_cache(0), table, lens)
    for i, s in enumerate(seqs):
        k, v = dense[s]
        want = memattn.attention(q[i:i + 1], k.unsqueeze(0), v.unsqueeze(0), causal=True)
        assert (out[i] - want[0]).abs().max() <= 1e-12


def test_bad_input():
    q, kc, vc, table, seqlens, _ = _problem([10, 20], [1], 16, 4, 2, 64, packed=False)
    with pytest.raises(ValueError, match="block id 99"):
        bad = table.clone()
        bad[1, 0] = 99
        paged_attention(q, kc, vc, bad, seqlens)
    with pytest.raises(ValueError, match="exceeds what block_table covers"):
        paged_attention(q, kc, vc, table[:, :1], seqlens)
    with pytest.raises(TypeError, match="block_table must be int32"):
        paged_attention(q, kc, vc, table.long(), seqlens)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        paged_attention(q, kc, vc, table, seqlens.long())
    with pytest.raises(ValueError, match="shorter than its 1 queries"):
        paged_attention(q, kc, vc, table, torch.tensor([0, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention(q[:, 0], kc, vc, table, seqlens, cu_seqlens_q=torch.tensor([0, 2, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of cache kv heads"):
        paged_attention(q[:, :, :3], kc, vc, table, seqlens)
    with pytest.raises(TypeError, match="share a dtype"):
        paged_attention(q.float(), kc, vc, table, seqlens)
    with pytest.raises(ValueError, match="batch"):
        paged_attention(q[:1], kc, vc, table, seqlens)


def _shared_problem(lens, bs, h, hkv, d):
    """Decode problem whose tables share blocks: a common prefix (prefix caching / forks) and random repeats."""
    q, kc, vc, table, seqlens, _ = _problem(lens, [1], bs, h, hkv, d, packed=False)
    table[1:, :2] = table[0, :2]  # every sequence shares sequence 0's first two blocks
    table[-1, 2:4] = table[-1, 0]  # one table names a block three times
    return q, kc, vc, table, seqlens


def _spy(monkeypatch, module):
    """Count calls of module.decode (so a test knows which schedule ran)."""
    calls = []
    real = module.decode

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(module, "decode", spy)
    return calls


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the native C kernel's calls; skips where no C compiler can build it."""
    if not native.available():
        pytest.skip("the native paged decode kernel could not be built here (no C compiler)")
    return _spy(monkeypatch, paged_native)


@pytest.fixture
def pool_calls(monkeypatch):
    """Counts the zero-copy pool schedule's calls, forced by name (so float32 runs the pool too)."""
    calls = _spy(monkeypatch, paged_pool)
    with kernels.use_backend(decode="pool"):
        yield calls


# slack 0: every sharing layer gathered; huge: every layer attended in place over its id range
@pytest.mark.parametrize("bs,h,hkv,slack", [(8, 8, 1, 4), (16, 4, 4, 4), (32, 8, 1, 4), (16, 8, 1, 0),
                                            (8, 4, 4, 10**9)])
def test_decode_pool_shared_blocks(bs, h, hkv, slack, pool_calls, monkeypatch):
    _seed()
    monkeypatch.setattr(paged_pool, "_RANGE_SLACK", slack)
    lens = [1, bs, 3 * bs, 2 * bs + 5, 97, 4 * bs]  # context 1, exact multiples of the block, ragged
    q, kc, vc, table, seqlens = _shared_problem(lens, bs, h, hkv, 64)
    _check(q, kc, vc, table, seqlens, None, dtype=torch.bfloat16 if slack == 4 else torch.float32)
    assert pool_calls


@pytest.mark.parametrize("window", [(0, 0), (5, 0), (16, 0), (3, 7)])
def test_decode_pool_window(window, pool_calls):
    _seed()
    q, kc, vc, table, seqlens = _shared_problem([1, 16, 50, 81, 64], 16, 8, 2, 64)
    _check(q, kc, vc, table, seqlens, None, window_size=window, causal=window[1] == 0)
    assert pool_calls


def test_decode_pool_fallbacks(monkeypatch):
    """ALiBi and softcap stay on the gather schedule (the fused kernel has neither); forced, the pool refuses."""
    _seed()
    q, kc, vc, table, seqlens = _shared_problem([1, 16, 50], 16, 4, 2, 64)
    slopes = torch.rand(4, dtype=torch.float64)
    pool_calls = _spy(monkeypatch, paged_pool)
    for kw in (dict(alibi_slopes=slopes), dict(softcap=2.0)):  # float64: not the native kernel's either
        out = paged_attention(q, kc, vc, table, seqlens, **kw)
        ref = paged_attention_reference(q, kc, vc, table, seqlens, **kw)
        assert (out - ref).abs().max() <= 1e-10
    assert not pool_calls
    with kernels.use_backend(decode="pool"):
        for kw, what in ((dict(alibi_slopes=slopes), "ALiBi"), (dict(softcap=2.0), "softcap")):
            with pytest.raises(ValueError, match=f"pool decode kernel cannot run.*no {what}"):
                paged_attention(q, kc, vc, table, seqlens, **kw)


def test_segment_merge_empty_sequence():
    """A sequence that no row feeds (no visible key) gets out 0 and lse -inf, never NaN; the pool's dropped
    rows (its unused blocks) go to a row past the sequences, here row 2."""
    o = torch.randn(3, 2, 4, dtype=torch.float64)
    lse = torch.tensor([[0.5, -1.0], [float("-inf"), 2.0], [7.0, 7.0]], dtype=torch.float64)
    out, out_lse = merge.merge_segments([(o.clone(), lse, torch.tensor([0, 0, 2]))], 3)
    out, out_lse = out[:2], out_lse[:2]
    assert (out[1] == 0).all() and torch.isneginf(out_lse[1]).all() and not out.isnan().any()
    want_lse = torch.logsumexp(lse[:2], 0)
    assert torch.allclose(out_lse[0], want_lse)
    w = torch.exp(lse[:2] - want_lse).unsqueeze(2)
    assert torch.allclose(out[0], (w * o[:2]).sum(0))


@pytest.mark.parametrize("vb", [2, 8])
@pytest.mark.parametrize("window", [(-1, -1), (70, 0)])
def test_decode_pool_virtual_blocks(vb, window, pool_calls, monkeypatch):
    """Runs of consecutive physical blocks (sequential allocation) are attended as one larger tile; some runs
    are misaligned, broken or shared, and the ragged tails stay single blocks."""
    _seed()
    monkeypatch.setattr(paged_pool, "VIRTUAL_BLOCKS", vb)
    bs, lens = 8, [1, 8 * 8, 8 * 8 + 3, 150, 200]
    q, kc, vc, table, seqlens, _ = _problem(lens, [1], bs, 8, 2, 32, packed=False)
    kc, vc = torch.randn(120, bs, 2, 32, dtype=torch.float64), torch.randn(120, bs, 2, 32, dtype=torch.float64)
    table = torch.stack([torch.arange(table.shape[1]) + off for off in (0, 16, 32, 57, 88)]).to(torch.int32)
    table[2, 1] = 5  # a broken run
    table[4, :vb] = table[1, :vb]  # a shared (aligned) run
    sizes, real = [], paged_pool._attend_layer
    monkeypatch.setattr(paged_pool, "_attend_layer", lambda qx, k, *a: sizes.append(k.shape[1]) or real(qx, k, *a))
    _check(q, kc, vc, table, seqlens, None, window_size=window)
    assert pool_calls and vb * bs in sizes and bs in sizes


@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("h,hkv", [(8, 1), (4, 4), (6, 2)])
def test_decode_native(bs, d, h, hkv, native_calls):
    """The C kernel on random repeating tables: contexts of 1, exact block multiples, ragged; shared blocks;
    float32, bfloat16 and float16 caches."""
    _seed()
    _check(*_problem([1, bs, 3 * bs, 2 * bs + 5, 97], [1], bs, h, hkv, d, packed=False))
    q, kc, vc, table, seqlens = _shared_problem([1, bs, 3 * bs, 97, 4 * bs], bs, h, hkv, d)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _check(q, kc, vc, table, seqlens, None, dtype=dtype)
    assert len(native_calls) == 4


@pytest.mark.parametrize("options", [
    dict(window_size=(0, 0)),
    dict(window_size=(5, 0)),
    dict(window_size=(16, 0)),
    dict(causal=False, window_size=(3, 7)),
    dict(alibi_slopes="heads"),
    dict(alibi_slopes="batch", window_size=(9, 0)),
    dict(softcap=3.0),
    dict(softcap=2.0, alibi_slopes="heads", softmax_scale=0.3),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_decode_native_options(options, native_calls):
    _seed()
    lens = [1, 16, 50, 81, 64]
    q, kc, vc, table, seqlens = _shared_problem(lens, 16, 8, 2, 64)
    _check(q, kc, vc, table, seqlens, None, **_with_slopes(options, len(lens), 8))
    assert native_calls


@pytest.mark.parametrize("threads", [1, 2, 7])
@pytest.mark.parametrize("window", [(-1, -1), (100, 0)])
def test_decode_native_splits(threads, window, native_calls, monkeypatch):
    """Long contexts split into runs of blocks on several threads (flash-decoding), merged by log-sum-exp:
    a batch of one, splits that start past a short sequence's end, windows that skip whole splits."""
    _seed()
    monkeypatch.setattr(paged_native, "MIN_SPLIT_TOKENS", 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert paged_native._splits(1, 40, 8, threads)[0] == (1 if threads == 1 else min(4 * threads, 20))
    for lens in ([317], [317, 3, 40, 1]):
        q, kc, vc, table, seqlens, _ = _problem(lens, [1], 8, 4, 2, 64, packed=False)
        _check(q, kc, vc, table, seqlens, None, window_size=window)
    assert len(native_calls) == 2


def test_decode_native_fallbacks(native_calls, monkeypatch):
    """float64 uses the pool schedule (each _check also runs float64: one native call per check, not two);
    odd head dims take the kernel's generic passes; MEMATTN_NATIVE=0 turns the kernel off."""
    _seed()
    problem = _problem([1, 9, 20], [1], 8, 2, 1, 520, packed=False)
    _check(*problem, dtype=torch.bfloat16)
    assert len(native_calls) == 1
    _check(*_problem([1, 9, 40], [1], 8, 2, 1, 36, packed=False), dtype=torch.float16)
    assert len(native_calls) == 2
    _check(*problem)
    assert len(native_calls) == 3
    monkeypatch.setenv("MEMATTN_NATIVE", "0")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert not native.available()
    _check(*problem)
    assert len(native_calls) == 3


@pytest.mark.parametrize("packed", [False, True])
def test_metadata_call_equals_plain_call(packed):
    """Metadata validated once serves every layer: the same result as validating per call, for any
    window (its ranges are built per window edge) and ALiBi."""
    _seed()
    lens, q_lens = [1, 16, 50, 81], ([1, 7, 1, 30] if packed else [1])
    q, kc, vc, table, seqlens, cu = _problem(lens, q_lens, 16, 8, 2, 64, packed=packed)
    md = paged.paged_metadata(table, seqlens, cu, num_blocks=kc.shape[0], block_size=kc.shape[1])
    for kw in (dict(), dict(window_size=(5, 0)), dict(alibi_slopes=torch.rand(len(lens), 8, dtype=torch.float64)),
               dict(window_size=(9, 0))):
        plain = paged_attention(q, kc, vc, table, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
        for args in ((table, seqlens, cu), (None, None, None)):
            built = paged_attention(q, kc, vc, *args[:2], cu_seqlens_q=args[2], metadata=md, return_lse=True, **kw)
            assert torch.equal(built[0], plain[0]) and torch.equal(built[1], plain[1])


def test_metadata_for_other_sizes_is_rejected():
    q, kc, vc, table, seqlens, _ = _problem([10, 20], [1], 16, 4, 2, 64, packed=False)
    md = paged.paged_metadata(table, seqlens, num_blocks=kc.shape[0], block_size=16)
    with pytest.raises(ValueError, match="metadata was built for a pool of"):
        paged_attention(q, kc[:-1], vc[:-1], table, seqlens, metadata=md)
    other = paged.paged_metadata(table, seqlens, num_blocks=kc.shape[0], block_size=32)
    with pytest.raises(ValueError, match="blocks of 32 tokens"):
        paged_attention(q, kc, vc, table, seqlens, metadata=other)
    with pytest.raises(ValueError, match="q batch 2 x seqlen_q 3 != block_table rows 2 x 1"):
        paged_attention(q.expand(2, 3, 4, 64), kc, vc, table, seqlens, metadata=md)
    packed = paged.paged_metadata(table, seqlens, torch.tensor([0, 1, 2], dtype=torch.int32),
                                  num_blocks=kc.shape[0], block_size=16)
    with pytest.raises(ValueError, match="total_q = 3, but it ends at 2"):
        paged_attention(torch.cat([q[:, 0], q[:1, 0]]), kc, vc, None, None, metadata=packed)
    with pytest.raises(ValueError, match="block_table is not the tensor the metadata was built from"):
        paged_attention(q, kc, vc, table.clone(), seqlens, metadata=md)
    with pytest.raises(TypeError, match="metadata must be a PagedMetadata"):
        paged_attention(q, kc, vc, table, seqlens, metadata=(table, seqlens))
    with pytest.raises(ValueError, match="block id 99"):  # built metadata is validated as a plain call is
        bad = table.clone()
        bad[1, 0] = 99
        paged.paged_metadata(bad, seqlens, num_blocks=kc.shape[0], block_size=16)


def test_visible_ranges():
    lens = torch.tensor([1, 5, 40], dtype=torch.int32)
    assert paged_decode.visible_ranges(lens).tolist() == [[[0, 1]], [[0, 5]], [[0, 40]]]
    assert paged_decode.visible_ranges(lens, 3).tolist() == [[[0, 1]], [[1, 5]], [[36, 40]]]
    assert paged_decode.visible_ranges(lens, 0).tolist() == [[[0, 1]], [[4, 5]], [[39, 40]]]


def test_decode_kernel_query_pos(native_calls):
    """The decode contract's query_pos: ALiBi measures distances from it (default: the last visible token)."""
    _seed()
    lens, h, d = [1, 16, 50], 4, 64
    q, kc, vc, table, seqlens, _ = _problem(lens, [1], 16, h, 2, d, packed=False)
    slopes = torch.rand(len(lens), h)
    pos = torch.tensor([3, 20, 49])
    ranges = paged_decode.visible_ranges(seqlens)
    out, lse = paged_native.decode(q[:, 0].float(), kc.float(), vc.float(), table, ranges, scale=d ** -0.5,
                                   alibi_slopes=slopes, query_pos=pos)
    for b, n in enumerate(lens):
        k, v = (c[table[b].long()].flatten(0, 1)[:n].unsqueeze(0) for c in (kc, vc))
        dist = (pos[b] - torch.arange(n)).to(torch.float32)
        bias = -slopes[b].view(1, h, 1, 1) * dist

        def ref(t):
            return memattn.reference.attention(q[b:b + 1].to(t), k.to(t), v.to(t), bias=bias, return_lse=True)
        (r, rl), (nv, nl) = ref(torch.float64), ref(torch.float32)
        assert (out[b].double() - r[0, 0]).abs().max() <= 2 * (nv.double() - r).abs().max() + 1e-6
        assert (lse[b].double() - rl[0, :, 0]).abs().max() <= 2 * (nl.double() - rl).abs().max() + 1e-5


def test_decode_kernels_refuse_what_they_do_not_read():
    """Two visible ranges, sink logits and quantized-cache scales are room in the signature, read by no kernel yet."""
    q, kc, vc, table, seqlens, _ = _problem([10, 20], [1], 16, 4, 2, 64, packed=False)
    ranges = paged_decode.visible_ranges(seqlens)
    two = torch.cat([ranges, ranges], 1)
    for kw in (dict(ranges=two), dict(ranges=ranges, sinks=torch.zeros(4)),
               dict(ranges=ranges, kv_scales=(torch.ones(kc.shape[:3]), torch.ones(kc.shape[:3])))):
        with pytest.raises(ValueError, match="pool decode kernel reads one visible range"):
            paged_pool.decode(q[:, 0], kc, vc, table, scale=0.125, **kw)
    assert paged_pool.decode(q[:, 0], kc, vc, table, ranges, scale=0.125)[0].shape == (2, 4, 64)
