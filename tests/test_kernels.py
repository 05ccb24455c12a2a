"""The capability records of ``memattn.kernels``: selection, forcing by name, the reasons a backend refuses."""
from __future__ import annotations

import pytest
import torch

import memattn
from memattn import kernels
from memattn.kernels import native


def test_tile_selection_asks_the_records():
    q = torch.randn(1, 4, 2, 16)
    assert kernels.choose(q).name == "cpu_flash" and kernels.select(q) is kernels.cpu_flash
    assert kernels.choose(q, softcap=2.0).name == "torch" and kernels.select(q, softcap=2.0) is kernels.torch_tiles
    # the backward with an lse gradient cannot run on the fused CPU tile: the records say so
    assert kernels.choose(q, dlse=True).name == "torch"
    with pytest.raises(ValueError, match="unknown tile backend 'cuda'"):
        kernels.select(q, impl="cuda")
    with pytest.raises(ValueError, match="cpu_flash tile backend cannot run .*no softcap"):
        kernels.choose(q, softcap=2.0, impl="cpu_flash")
    # nothing fits: every backend's reason, in order (no tile takes sink logits yet)
    with pytest.raises(ValueError, match="no tile backend fits.*triton: .*; cpu_flash: no sink logits; torch: no sink"):
        kernels.choose(q, sinks=True)


def test_use_backend_nests_and_restores():
    q = torch.randn(1, 4, 2, 16)
    with memattn.use_backend("torch"):
        assert kernels.choose(q).name == "torch"
        with kernels.use_backend("cpu_flash"):
            assert kernels.choose(q).name == "cpu_flash"
            with pytest.raises(ValueError, match="no softcap"):  # forced, it refuses instead of falling back
                memattn.attention(q, q, q, softcap=2.0)
        assert kernels.choose(q).name == "torch"
        assert kernels.forced() == ("torch", None)
    assert kernels.forced() == (None, None)
    with pytest.raises(ValueError, match="unknown tile backend"):
        with kernels.use_backend("flash3"):
            pass
    with pytest.raises(ValueError, match="unknown decode kernel"):
        with kernels.use_backend(decode="flashinfer"):
            pass


def test_decode_kernel_choice():
    tile = kernels.backend("cpu_flash")
    q32, q64 = torch.randn(2, 4, 16), torch.randn(2, 4, 16, dtype=torch.float64)
    want32 = "native" if native.available() else "pool"
    assert kernels.choose_decode(q32, torch.float32, tile).name == want32
    assert kernels.choose_decode(q64, torch.float64, tile).name == "pool"  # the C kernel reads no float64
    assert kernels.choose_decode(q64, torch.float64, tile, alibi=True) is None  # the gather schedule
    assert kernels.choose_decode(q32, torch.float32, kernels.backend("torch"), ranges=2) is None
    with kernels.use_backend(decode="gather"):
        assert kernels.choose_decode(q32, torch.float32, tile) is None
    with kernels.use_backend(decode="pool"):
        assert kernels.choose_decode(q32, torch.float32, tile).name == "pool"
        with pytest.raises(ValueError, match="pool decode kernel cannot run .*no ALiBi"):
            kernels.choose_decode(q32, torch.float32, tile, alibi=True)
        with pytest.raises(ValueError, match="no KV format 'int8'"):
            kernels.choose_decode(q32, torch.int8, tile, kv_format="int8")
