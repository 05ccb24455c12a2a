"""Feature maps phi for linear attention: softmax(q k^T) v is replaced by phi(q) (phi(k)^T v).

A feature map is any callable taking x (..., D) to features (..., D_phi), applied alike to
queries and keys. Named maps:

- ``"elu"``: elu(x) + 1 (Katharopoulos et al. 2020), positive, D_phi = D;
- ``"relu"``: relu(x), non-negative, D_phi = D (a row whose features are all 0 outputs 0);
- ``"identity"``: x, D_phi = D (not positive: use ``normalize=False`` unless you know the
  normaliser stays away from 0);
- ``"favor"``: FAVOR+ positive orthogonal random features (Choromanski et al. 2020), an
  unbiased estimate of the softmax kernel exp(q.k / sqrt(D)); see :class:`FavorFeatures`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "relu", "identity", "favor")


def elu_features(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def relu_features(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def identity_features(x: torch.Tensor) -> torch.Tensor:
    return x


def _orthogonal_gaussian(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(num_rows, dim) float64: stacked orthogonal d x d blocks, row norms drawn like a Gaussian's.

    Orthogonal rows lower the estimator's variance; rescaling each row by the norm of an
    independent Gaussian vector keeps every row marginally N(0, I) so the estimate stays unbiased.
    """
    blocks = []
    for _ in range(math.ceil(num_rows / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        # Fix the QR sign ambiguity so the block is Haar-distributed.
        blocks.append((qmat * torch.sign(torch.diagonal(r))).T)
    rows = torch.cat(blocks)[:num_rows]
    norms = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return rows * norms


class FavorFeatures:
    """FAVOR+ positive orthogonal random features for the softmax kernel exp(q . k / sqrt(D)).

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = x / D^(1/4) and W (m, D) orthogonal
    Gaussian rows, so E[phi(q) . phi(k)] = exp(q . k / sqrt(D)). The exponent is at most
    |w|^2 / 2 for any input, so the keys' running sums cannot overflow float32 for the usual
    head dims (the state is always accumulated in float32 or float64).

    Args:
        num_features: m; default int(D * ln D) (Performer's choice), fixed at the first call.
        seed: the projections are a pure function of (seed, number of redraws), so two maps
            with one seed agree and a run is reproducible.
        redraw_interval: in training mode, draw a new projection every this many calls
            (None = never). In eval mode (``.eval()``) the projection never changes.

    ``redraw()`` draws a new projection now. The map must be given the same head dim every call.
    """

    def __init__(self, num_features: int | None = None, *, seed: int = 0, redraw_interval: int | None = None):
        for name, value in (("num_features", num_features), ("redraw_interval", redraw_interval)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.num_features = num_features
        self.seed = seed
        self.redraw_interval = redraw_interval
        self.training = True
        self.draws = 0
        self._calls = 0
        self._head_dim: int | None = None
        self._projection: torch.Tensor | None = None  # (m, D) float64 on CPU; cast per call

    def train(self, mode: bool = True) -> "FavorFeatures":
        self.training = mode
        return self

    def eval(self) -> "FavorFeatures":
        return self.train(False)

    def redraw(self) -> None:
        """Draw a new projection (the next one in this seed's sequence)."""
        self.draws += 1
        self._projection = None

    def projection(self, head_dim: int) -> torch.Tensor:
        """The current (num_features, head_dim) projection, float64 on CPU."""
        if self._head_dim is not None and head_dim != self._head_dim:
            raise ValueError(f"this FAVOR+ map was built for head_dim {self._head_dim}, got {head_dim}")
        if self._projection is None:
            if self.num_features is None:
                self.num_features = max(1, int(head_dim * math.log(head_dim))) if head_dim > 1 else 1
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
            self._projection = _orthogonal_gaussian(self.num_features, head_dim, gen)
            self._head_dim = head_dim
        return self._projection

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> features (..., num_features) in x's dtype (compute in float32 or wider)."""
        if self.training and self.redraw_interval is not None:
            if self._calls and self._calls % self.redraw_interval == 0:
                self.redraw()
            self._calls += 1
        d = x.shape[-1]
        w = self.projection(d).to(device=x.device, dtype=x.dtype)
        x = x * d ** -0.25
        logits = x @ w.T - (x * x).sum(-1, keepdim=True) / 2
        return torch.exp(logits) * self.num_features ** -0.5

    def __repr__(self) -> str:
        return (f"FavorFeatures(num_features={self.num_features}, seed={self.seed}, "
                f"redraw_interval={self.redraw_interval}, draws={self.draws})")


_NAMED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": elu_features, "relu": relu_features, "identity": identity_features,
}


def resolve_feature_map(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    """A name from FEATURE_MAPS, a FavorFeatures instance or any callable -> the callable."""
    if isinstance(feature_map, str):
        if feature_map == "favor":
            return FavorFeatures()
        if feature_map in _NAMED:
            return _NAMED[feature_map]
        raise ValueError(f"unknown feature_map {feature_map!r}; choose from {list(FEATURE_MAPS)} or pass a callable")
    if callable(feature_map):
        return feature_map
    raise TypeError(f"feature_map must be a name or a callable, got {type(feature_map).__name__}")
