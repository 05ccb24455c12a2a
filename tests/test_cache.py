"""Contiguous caches (growing, pre-allocated, sliding-window ring) and the paged block pool."""
import pytest
import torch

import memattn
from memattn.cache import KVCache, PagedKVCache, SlidingWindowKVCache


def _kv(b, n, hkv=2, d=16):
    return torch.randn(b, n, hkv, d, dtype=torch.float64), torch.randn(b, n, hkv, d, dtype=torch.float64)


@pytest.mark.parametrize("max_seqlen", [None, 40])
def test_kv_cache_append_crop_reorder(max_seqlen):
    cache = KVCache(3, 2, 16, max_seqlen=max_seqlen, initial_capacity=4, dtype=torch.float64)
    ks, vs = [], []
    for n in (5, 1, 1, 9):
        k, v = _kv(3, n)
        keys, values = cache.update(k, v)
        ks.append(k)
        vs.append(v)
        assert torch.equal(keys, torch.cat(ks, 1)) and torch.equal(values, torch.cat(vs, 1))
    assert cache.seqlen == 16 and cache.capacity >= 16
    cache.crop(6)
    assert torch.equal(cache.keys, torch.cat(ks, 1)[:, :6])
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.values, torch.cat(vs, 1)[[2, 2, 0], :6])
    if max_seqlen is not None:
        with pytest.raises(ValueError, match="cache is full"):
            cache.update(*_kv(3, 35))
    with pytest.raises(ValueError, match="crop length"):
        cache.crop(7)
    with pytest.raises(ValueError, match="kv_heads"):
        cache.update(*_kv(3, 1, hkv=3))


@pytest.mark.parametrize("chunks", [[1] * 23, [5, 1, 1, 9, 1, 1, 1, 3], [13, 10]])
def test_sliding_window_ring_matches_full_attention(chunks):
    """Decode and chunked updates past the wrap give the same output as windowed attention on the full sequence."""
    w, total = 6, sum(chunks)
    cache = SlidingWindowKVCache(2, w, 2, 16, dtype=torch.float64)
    k_all, v_all = _kv(2, total)
    q_all = torch.randn(2, total, 4, 16, dtype=torch.float64)
    want = memattn.attention(q_all, k_all, v_all, causal=True, window_size=(w - 1, 0))
    pos = 0
    for n in chunks:
        keys, values = cache.update(k_all[:, pos:pos + n], v_all[:, pos:pos + n])
        assert keys.shape[1] <= w - 1 + n
        got = memattn.attention(q_all[:, pos:pos + n], keys, values, causal=True, window_size=cache.window_size)
        assert (got - want[:, pos:pos + n]).abs().max() <= 1e-12
        pos += n
    assert cache.capacity == w
    assert torch.equal(cache.keys, k_all[:, total - w:])
    assert torch.equal(cache.values, v_all[:, total - w:])


def _pool(**kw):
    return PagedKVCache(2, 6, 4, 2, 8, dtype=torch.float64, **kw)


def test_paged_write_and_copy_blocks():
    pool = _pool()
    k, v = torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(5, 2, 8, dtype=torch.float64)
    slots = torch.tensor([9, 10, -1, 4, 23], dtype=torch.int32)  # -1: padding, skipped
    pool.write(slots, k, v, layer=1)
    kc = pool.key_cache(1).reshape(-1, 2, 8)
    assert torch.equal(kc[[9, 10, 4, 23]], k[[0, 1, 3, 4]])
    assert torch.equal(pool.value_cache(1).reshape(-1, 2, 8)[9], v[0])
    assert pool.key_cache(0).abs().sum() == 0  # other layer untouched
    pool.copy_blocks([(2, 0), (5, 3)])
    for layer in (0, 1):
        assert torch.equal(pool.key_cache(layer)[0], pool.key_cache(layer)[2])
        assert torch.equal(pool.value_cache(layer)[3], pool.value_cache(layer)[5])
    with pytest.raises(ValueError, match="out of range"):
        pool.write(torch.tensor([24]), k[:1], v[:1])
    with pytest.raises(TypeError, match="slot_mapping"):
        pool.write(torch.tensor([1.0]), k[:1], v[:1])
    assert pool.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 8


@pytest.mark.parametrize("mmap", [False, True])
def test_paged_swap_out_and_in(tmp_path, mmap):
    pool = _pool(swap_blocks=3, swap_path=str(tmp_path / "swap.bin") if mmap else None)
    pool.kv.copy_(torch.randn(pool.kv.shape, dtype=torch.float64))
    saved = pool.kv[:, :, [1, 4]].clone()
    slots = pool.swap_out([1, 4])
    pool.kv[:, :, [1, 4]] = 0  # the blocks are reused meanwhile
    pool.swap_in(slots, [0, 5])
    assert torch.equal(pool.kv[:, :, [0, 5]], saved)
    with pytest.raises(ValueError, match="hold nothing"):
        pool.swap_in(slots, [0, 5])
    with pytest.raises(RuntimeError, match="swap space full"):
        pool.swap_out([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="no second tier"):
        _pool().swap_out([0])


def test_paged_swap_out_into_reserved_slots():
    """A planner reserves slots first (they stop counting as free); the copy into them comes later."""
    pool = _pool(swap_blocks=3)
    pool.kv.copy_(torch.randn(pool.kv.shape, dtype=torch.float64))
    slots = pool.reserve_swap(2)
    assert pool.num_free_swap_slots == 1
    with pytest.raises(RuntimeError, match="swap space full"):
        pool.reserve_swap(2)
    free = (set(range(3)) - set(slots)).pop()
    with pytest.raises(ValueError, match="hold nothing"):
        pool.swap_out([1], [free])
    with pytest.raises(ValueError, match="2 swap slots for 1 blocks"):
        pool.swap_out([1], slots)
    saved = pool.kv[:, :, [4, 1]].clone()
    assert pool.swap_out([4, 1], slots) == slots
    pool.swap_in(slots, [0, 2])
    assert torch.equal(pool.kv[:, :, [0, 2]], saved) and pool.num_free_swap_slots == 3


def test_hugepage_pool_is_zeros():
    """The pool allocator gives zeros of the asked shape and dtype whether or not the OS grants huge pages."""
    from memattn.cache import hugepages
    for shape, dtype in (((3, 5), torch.float32), ((2, 4096, 16, 2, 64), torch.bfloat16)):
        t = hugepages.zeros(shape, dtype=dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and not t.any()
    assert hugepages._madvise_huge(torch.empty(10)) is False  # no 2 MiB-aligned page inside: nothing advised
