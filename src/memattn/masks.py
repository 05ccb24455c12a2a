"""Mask specifications -> block layouts, without ever building an Sq x Sk mask.

A mask says which (query i, key j) pairs are visible. The blockwise schedule asks a mask two
things about a grid of tiles:

- ``block_kinds(seqlen_q, seqlen_k, q_edges, k_edges)``: an int8 (nQ, nK) matrix of
  EMPTY (skip the tile), FULL (compute it with no mask) or PARTIAL (compute it with an element mask);
- ``element_mask(seqlen_q, seqlen_k, q0, q1, k0, k1)``: the bool mask of one tile, broadcastable
  to (B, H, q1 - q0, k1 - k0), True = visible. Only PARTIAL tiles ever ask for it.

Positions are absolute indices; seqlen_q/seqlen_k are passed because causal masks are aligned
bottom-right (FlashAttention >= 2.1): query i may see key j iff j <= i + Sk - Sq. Sq=2, Sk=5:

        1 1 1 1 0
        1 1 1 1 1

Masks compose with ``&`` and ``|``.
"""
from __future__ import annotations

import torch

EMPTY, FULL, PARTIAL = 0, 1, 2


def edges(seqlen: int, block: int, offset: int = 0) -> torch.Tensor:
    """Tile boundaries as an int64 tensor: 0, then every ``offset + n * block`` inside (0, seqlen), then seqlen.

    With offset = Sk - Sq for the key axis, key tiles line up with query tiles along the
    bottom-right diagonal, so causal diagonal tiles are square (first/last tiles may be short).
    """
    first = offset % block or block
    e = [0] + list(range(first, seqlen, block)) + [seqlen]
    return torch.tensor(e, dtype=torch.int64)


class Mask:
    """Base class. Subclasses override ``element_mask`` and, when they can, ``block_kinds``."""

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None) -> torch.Tensor:
        raise NotImplementedError

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None) -> torch.Tensor:
        """Generic classification: evaluate each tile's element mask (O(Sq*Sk) time, O(tile) memory)."""
        nq, nk = len(q_edges) - 1, len(k_edges) - 1
        kinds = torch.empty(nq, nk, dtype=torch.int8)
        for a in range(nq):
            for b in range(nk):
                m = self.element_mask(seqlen_q, seqlen_k, int(q_edges[a]), int(q_edges[a + 1]),
                                      int(k_edges[b]), int(k_edges[b + 1]), device)
                kinds[a, b] = FULL if bool(m.all()) else (EMPTY if not bool(m.any()) else PARTIAL)
        return kinds

    def tile_is_causal_diagonal(self, seqlen_q, seqlen_k, q0, q1, k0, k1) -> bool:
        """True if this tile's mask is exactly the top-left triangle j - k0 <= i - q0 (fused kernels take it natively)."""
        return False

    def dense(self, seqlen_q, seqlen_k, device=None) -> torch.Tensor:
        """The whole mask, broadcastable to (B, H, Sq, Sk). For tests and the standard method only."""
        return self.element_mask(seqlen_q, seqlen_k, 0, seqlen_q, 0, seqlen_k, device)

    def __and__(self, other: "Mask") -> "Mask":
        return AndMask([self, other])

    def __or__(self, other: "Mask") -> "Mask":
        return OrMask([self, other])


class WindowMask(Mask):
    """Key j is visible to query i iff i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1 = unbounded)."""

    def __init__(self, left: int = -1, right: int = -1):
        self.left, self.right = int(left), int(right)

    def __repr__(self):
        return "causal()" if (self.left, self.right) == (-1, 0) else f"sliding_window({self.left}, {self.right})"

    def _bounds(self, i: torch.Tensor, seqlen_q: int, seqlen_k: int):
        """Visible key range [lo, hi] for each query index in `i` (int64 tensors)."""
        off = seqlen_k - seqlen_q
        big = seqlen_q + seqlen_k + 1
        lo = i + off - self.left if self.left >= 0 else i - big
        hi = i + off + self.right if self.right >= 0 else i + big
        return lo, hi

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        i = torch.arange(q0, q1, device=device).unsqueeze(1)
        j = torch.arange(k0, k1, device=device).unsqueeze(0)
        lo, hi = self._bounds(i, seqlen_q, seqlen_k)
        return ((j >= lo) & (j <= hi)).view(1, 1, q1 - q0, k1 - k0)

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        # lo/hi grow with i, so a tile's reachable keys span [lo(q0), hi(q1-1)] and every row
        # covers the tile iff lo(q1-1) <= k0 and hi(q0) >= k1-1.
        qs, qe = q_edges[:-1].unsqueeze(1), (q_edges[1:] - 1).unsqueeze(1)
        ks, ke = k_edges[:-1].unsqueeze(0), (k_edges[1:] - 1).unsqueeze(0)
        lo_first, hi_first = self._bounds(qs, seqlen_q, seqlen_k)
        lo_last, hi_last = self._bounds(qe, seqlen_q, seqlen_k)
        empty = (hi_last < ks) | (lo_first > ke)
        full = (lo_last <= ks) & (hi_first >= ke)
        kinds = torch.full(empty.shape, PARTIAL, dtype=torch.int8)
        kinds[full] = FULL
        kinds[empty] = EMPTY
        return kinds

    def tile_is_causal_diagonal(self, seqlen_q, seqlen_k, q0, q1, k0, k1):
        if self.right != 0 or q1 - q0 != k1 - k0 or k0 != q0 + seqlen_k - seqlen_q:
            return False
        # the window's left edge must not cut into the tile
        return self.left < 0 or self.left >= (q1 - q0 - 1)


def causal() -> WindowMask:
    """Bottom-right aligned causal mask: query i sees key j iff j <= i + Sk - Sq."""
    return WindowMask(-1, 0)


def sliding_window(left: int, right: int = 0) -> WindowMask:
    """Query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right; -1 = unbounded."""
    for name, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, int) or w < -1:
            raise ValueError(f"sliding_window {name} must be an int >= -1, got {w!r}")
    return WindowMask(left, right)


class KeyPaddingMask(Mask):
    """Per-sequence key padding: ``key_padding_mask`` bool (B, Sk), True = attend."""

    def __init__(self, key_padding_mask: torch.Tensor):
        self.kpm = key_padding_mask

    def __repr__(self):
        return f"key_padding(shape={tuple(self.kpm.shape)})"

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        return self.kpm[:, k0:k1].view(self.kpm.shape[0], 1, 1, k1 - k0)

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        kinds = []
        for b in range(len(k_edges) - 1):
            blk = self.kpm[:, int(k_edges[b]):int(k_edges[b + 1])]
            kinds.append(FULL if bool(blk.all()) else (EMPTY if not bool(blk.any()) else PARTIAL))
        row = torch.tensor(kinds, dtype=torch.int8)
        return row.unsqueeze(0).expand(len(q_edges) - 1, -1).clone()


class AndMask(Mask):
    """Visible where every part is visible."""

    def __init__(self, parts):
        self.parts = [p for m in parts for p in (m.parts if isinstance(m, AndMask) else [m])]

    def __repr__(self):
        return " & ".join(map(repr, self.parts))

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        out = None
        for p in self.parts:
            m = p.element_mask(seqlen_q, seqlen_k, q0, q1, k0, k1, device)
            out = m if out is None else out & m
        return out

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        ks = [p.block_kinds(seqlen_q, seqlen_k, q_edges, k_edges, device) for p in self.parts]
        stacked = torch.stack(ks)
        kinds = torch.full(ks[0].shape, PARTIAL, dtype=torch.int8)
        kinds[(stacked == FULL).all(0)] = FULL
        kinds[(stacked == EMPTY).any(0)] = EMPTY
        return kinds

    def tile_is_causal_diagonal(self, seqlen_q, seqlen_k, q0, q1, k0, k1):
        qe, ke = torch.tensor([q0, q1]), torch.tensor([k0, k1])
        diag = False
        for p in self.parts:
            if p.tile_is_causal_diagonal(seqlen_q, seqlen_k, q0, q1, k0, k1):
                diag = True
            elif int(p.block_kinds(seqlen_q, seqlen_k, qe, ke)[0, 0]) != FULL:
                return False
        return diag


class OrMask(Mask):
    """Visible where any part is visible."""

    def __init__(self, parts):
        self.parts = [p for m in parts for p in (m.parts if isinstance(m, OrMask) else [m])]

    def __repr__(self):
        return " | ".join(f"({p!r})" for p in self.parts)

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        out = None
        for p in self.parts:
            m = p.element_mask(seqlen_q, seqlen_k, q0, q1, k0, k1, device)
            out = m if out is None else out | m
        return out

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        ks = [p.block_kinds(seqlen_q, seqlen_k, q_edges, k_edges, device) for p in self.parts]
        stacked = torch.stack(ks)
        kinds = torch.full(ks[0].shape, PARTIAL, dtype=torch.int8)
        kinds[(stacked == EMPTY).all(0)] = EMPTY
        kinds[(stacked == FULL).any(0)] = FULL
        return kinds


def combine(*masks) -> Mask | None:
    """AND of the given masks, ignoring None; None when there is nothing to mask."""
    ms = [m for m in masks if m is not None]
    if not ms:
        return None
    return ms[0] if len(ms) == 1 else AndMask(ms)


class DenseMask(Mask):
    """A user-given bool tensor broadcastable to (B, H, Sq, Sk), True = visible.

    Accepted for compatibility: it already costs Sq x Sk memory, but empty tiles are still skipped.
    """

    def __init__(self, mask: torch.Tensor, *, batch: int, heads: int, seqlen_q: int, seqlen_k: int):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"a dense mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
        full = (batch, heads, seqlen_q, seqlen_k)
        if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
            raise ValueError(f"mask shape {tuple(mask.shape)} is not broadcastable to (B, H, Sq, Sk) = {full}")
        self.mask = mask.view(*([1] * (4 - mask.dim())), *mask.shape)
        self.seqlens = (seqlen_q, seqlen_k)

    def __repr__(self):
        return f"dense(shape={tuple(self.mask.shape)})"

    def _check(self, seqlen_q, seqlen_k):
        if (seqlen_q, seqlen_k) != self.seqlens:
            raise ValueError(f"dense mask was built for (Sq, Sk) = {self.seqlens}, used with {(seqlen_q, seqlen_k)}")

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        self._check(seqlen_q, seqlen_k)
        m = self.mask
        return m[..., q0:q1 if m.shape[2] > 1 else 1, k0:k1 if m.shape[3] > 1 else 1]

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        self._check(seqlen_q, seqlen_k)
        return Mask.block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device)
