"""The few-row linear kernel (``kernels.gemv``): F.linear's result within the rounding of its dtype."""
import pytest
import torch
import torch.nn.functional as F

from memattn.kernels import gemv, native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: gemv falls back to F.linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 960, 576), (1, 7, 13), (3, 130, 77), (8, 1029, 64), (5, 1, 8),
                                        (19, 70, 64),  # 19 rows: three runs
                                        # every row count's kernel, k past and short of its unrolled step
                                        (2, 33, 77), (4, 65, 40), (6, 17, 24), (7, 9, 200), (2, 5, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(dtype, rows, n, k, bias, monkeypatch):
    seed = rows * 1000 + n + k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    # both float32 routings, and both half routings (C kernel / the CPU's native half matmul) whatever this CPU is
    for route, native_half in ((True, False), (False, True)):
        monkeypatch.setattr(gemv, "ROUTE_FLOAT32", route)
        monkeypatch.setattr(gemv, "native_half_matmul", lambda dt, v=native_half: v)
        out = gemv.linear(x, w, b)
        assert out.dtype == dtype and out.shape == (rows, n)
        # float32 accumulation, then one rounding to dtype: half an ulp of dtype plus float32 sums
        tol = torch.finfo(dtype).eps * ref.abs().max().item() + 1e-5 * k * (x.double().abs().max() * w.double().abs().max()).item()
        err = (out.double() - ref).abs().max().item()
        assert err <= tol, f"seed {seed}: {err} > {tol}"


def test_native_half_matmul_reads_the_cpu_flags(monkeypatch):
    gemv.native_half_matmul.cache_clear()
    try:
        monkeypatch.setattr(native, "cpu_flags", lambda: "flags : fpu sse2 avx2 avx512f avx512_bf16")
        assert gemv.native_half_matmul(torch.bfloat16) and not gemv.native_half_matmul(torch.float16)
        assert gemv._c_rows(torch.bfloat16) == 1 and gemv._c_rows(torch.float16) == gemv.CHUNKED_ROWS
        assert gemv._c_rows(torch.float32) == gemv.CHUNKED_ROWS
        gemv.native_half_matmul.cache_clear()
        monkeypatch.setattr(native, "cpu_flags", lambda: "flags : fpu sse2 avx2 amx_fp16")
        assert gemv.native_half_matmul(torch.float16) and not gemv.native_half_matmul(torch.bfloat16)
    finally:
        gemv.native_half_matmul.cache_clear()


def test_many_rows_and_odd_shapes_fall_back():
    x = torch.randn(3, 13, 64, dtype=torch.bfloat16)  # 39 rows > CHUNKED_ROWS: PyTorch (float32 math)
    w = torch.randn(33, 64, dtype=torch.bfloat16)
    ref = F.linear(x.double(), w.double())
    out = gemv.linear(x, w)
    assert out.shape == (3, 13, 33) and out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    x1 = torch.randn(2, 1, 64, dtype=torch.bfloat16)  # 3-D, 2 rows: the kernel, viewed back
    assert torch.allclose(gemv.linear(x1, w).double(), F.linear(x1.double(), w.double()), rtol=0.02, atol=0.1)


def test_nan_propagates():
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    x[0, 3] = float("nan")
    out = gemv.linear(x, torch.randn(12, 16, dtype=torch.bfloat16))
    assert out.isnan().all()
