"""Input checks shared by the public entry points.

Every public function validates before any tensor work so that a bad call fails with a
message naming the sizes involved instead of a shape error deep inside torch.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_dense_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check q (B, Sq, H, D), k/v (B, Sk, Hkv, D) with H % Hkv == 0."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
    _check_common(q, k, v, batch_dim=True)


def check_packed_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check packed q (Tq, H, D), k/v (Tk, Hkv, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must have 3 dims (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    _check_common(q, k, v, batch_dim=False)


def _check_common(q, k, v, batch_dim: bool) -> None:
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q dtype must be one of float16/bfloat16/float32/float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if batch_dim and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    s = 1 if batch_dim else 0
    if k.shape[s] != v.shape[s]:
        raise ValueError(f"k and v must have the same seqlen, got {k.shape[s]} and {v.shape[s]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[-2]} and {v.shape[-2]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    if v.shape[-1] != k.shape[-1]:
        raise ValueError(f"v head_dim {v.shape[-1]} != k head_dim {k.shape[-1]}")
    h, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(
            f"query heads ({h}) must be a multiple of key/value heads ({hkv}) for MQA/GQA")
    if q.shape[-1] == 0:
        raise ValueError("head_dim must be > 0")


def check_positive_int(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def resolve_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def check_int32(name: str, t, dim: int) -> None:
    """t must be an int32 tensor with `dim` dims (block tables, context lengths, cu_seqlens)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dim(s), got shape {tuple(t.shape)}")


def check_key_padding_mask(mask, batch: int, seqlen_k: int, device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = attend), got {mask.dtype}")
    if tuple(mask.shape) != (batch, seqlen_k):
        raise ValueError(
            f"key_padding_mask must have shape (batch, seqlen_k) = ({batch}, {seqlen_k}), got {tuple(mask.shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")


def check_window(window_size) -> tuple[int, int]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"window_size must be a (left, right) pair, got {window_size!r}")
    left, right = window_size
    for name, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window_size {name} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window_size {name} must be >= -1 (-1 = unbounded), got {w}")
    return int(left), int(right)


def check_sinks(sinks, heads: int, dtype, device) -> None:
    """Learnable sink logits: a float tensor (heads,), float32 or the input dtype, on the input's device."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a tensor of one logit per query head, got {type(sinks).__name__}")
    if tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks must have shape (heads,) = ({heads},), got {tuple(sinks.shape)}")
    if sinks.dtype not in (torch.float32, dtype):
        raise TypeError(f"sinks must be float32 or the input dtype {dtype}, got {sinks.dtype}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}")
