"""How far a linear method is from exact softmax attention (for ``memattn compare``)."""
from __future__ import annotations

import torch

from ... import reference
from .api import linear_attention
from .feature_maps import FavorFeatures


def linear_attention_error(q, k, v, *, causal: bool = False, **kwargs) -> float:
    """Relative error ||out - exact|| / ||exact|| (Frobenius) of ``linear_attention`` against softmax.

    q (B, S, H, D), k/v (B, S, Hkv, D). The exact side is ``memattn.reference.attention`` in
    float64 with scale 1/sqrt(D) and the causal mask when causal; kwargs go to
    ``linear_attention`` (feature_map, form, chunk_size, ...). Only "favor" estimates the
    softmax kernel; the other maps are different models, and their error says by how much.
    """
    out = linear_attention(q, k, v, causal=causal, **kwargs).double()
    q64, k64, v64 = q.double(), k.double(), v.double()
    mask = None
    if causal:
        s = q.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    exact = reference.attention(q64, k64, v64, mask=mask)
    return ((out - exact).norm() / exact.norm()).item()


def favor_sweep(seq_len: int, head_dim: int, feature_counts, seed: int = 0, *, heads: int = 4,
                redraws: int = 4, causal: bool = False, qk_std: float = 0.5) -> list[tuple[int, float]]:
    """FAVOR+ error against exact softmax attention as the number of random features grows.

    Draws v ~ N(0, 1) and q, k ~ N(0, qk_std^2) of shape (1, seq_len, heads, head_dim) from
    `seed`, then for each m in feature_counts averages ``linear_attention_error`` over `redraws`
    projections (seeds seed+1 ...). Returns [(m, mean relative error), ...]; the error falls
    roughly like 1/sqrt(m) (Performer, Choromanski et al. 2020). The estimator's variance grows
    like exp(|q|^2 / sqrt(D)), so with qk_std near 1 many more features are needed for one digit.
    """
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, seq_len, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))
    q, k = q * qk_std, k * qk_std
    rows = []
    for m in feature_counts:
        errs = [linear_attention_error(q, k, v, causal=causal, feature_map=FavorFeatures(m, seed=seed + 1 + r))
                for r in range(redraws)]
        rows.append((int(m), sum(errs) / len(errs)))
    return rows
