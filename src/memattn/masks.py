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
    """Base class. Subclasses override ``element_mask`` and, when they can, ``block_kinds``.

    ``translation_invariant``: visibility depends on i - j alone, so the schedule may batch a band
    of query blocks that share one relative tile pattern. ``preferred_block``: a tile edge at which
    the layout is exact and cheap (block-sparse layouts), or None.
    """

    translation_invariant = False
    preferred_block: int | None = None
    max_keys_per_row: int | None = None  # a bound on visible keys per query, when the mask knows one

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

    translation_invariant = True

    def __init__(self, left: int = -1, right: int = -1):
        self.left, self.right = int(left), int(right)
        if self.left >= 0 and self.right >= 0:
            self.max_keys_per_row = self.left + self.right + 1

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


class _CombinedMask(Mask):
    """AND or OR of parts. The two are duals: OR's layout is AND's with FULL and EMPTY swapped."""

    is_and = True

    def __init__(self, parts):
        cls = type(self)
        self.parts = [p for m in parts for p in (m.parts if isinstance(m, cls) else [m])]
        self.translation_invariant = all(p.translation_invariant for p in self.parts)
        self.preferred_block = next((p.preferred_block for p in self.parts if p.preferred_block), None)
        bounds = [p.max_keys_per_row for p in self.parts if p.max_keys_per_row is not None]
        # a bound holds for AND if any part has one, for OR only if every part has one
        if self.is_and and bounds:
            self.max_keys_per_row = min(bounds)
        elif not self.is_and and len(bounds) == len(self.parts):
            self.max_keys_per_row = sum(bounds)

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        out = None
        for p in self.parts:
            m = p.element_mask(seqlen_q, seqlen_k, q0, q1, k0, k1, device)
            out = m if out is None else (out & m if self.is_and else out | m)
        return out

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        stacked = torch.stack([p.block_kinds(seqlen_q, seqlen_k, q_edges, k_edges, device) for p in self.parts])
        every, some = (FULL, EMPTY) if self.is_and else (EMPTY, FULL)
        kinds = torch.full(stacked.shape[1:], PARTIAL, dtype=torch.int8)
        kinds[(stacked == every).all(0)] = every
        kinds[(stacked == some).any(0)] = some
        return kinds


class AndMask(_CombinedMask):
    """Visible where every part is visible."""

    is_and = True

    def __repr__(self):
        return " & ".join(map(repr, self.parts))

    def tile_is_causal_diagonal(self, seqlen_q, seqlen_k, q0, q1, k0, k1):
        qe, ke = torch.tensor([q0, q1]), torch.tensor([k0, k1])
        diag = False
        for p in self.parts:
            if p.tile_is_causal_diagonal(seqlen_q, seqlen_k, q0, q1, k0, k1):
                diag = True
            elif int(p.block_kinds(seqlen_q, seqlen_k, qe, ke)[0, 0]) != FULL:
                return False
        return diag


class OrMask(_CombinedMask):
    """Visible where any part is visible."""

    is_and = False

    def __repr__(self):
        return " | ".join(f"({p!r})" for p in self.parts)


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


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _positions(seqlen_q, seqlen_k, q0, q1, k0, k1, device):
    """Absolute positions of a tile's queries (bottom-right aligned) and keys, as (tq, 1) and (1, tk)."""
    i = torch.arange(q0, q1, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)
    j = torch.arange(k0, k1, device=device).unsqueeze(0)
    return i, j


def _ranges_hit(lo, hi, members: torch.Tensor):
    """For ranges [lo, hi) (int64 tensors of one shape), how many of the sorted `members` fall inside."""
    return torch.searchsorted(members, hi) - torch.searchsorted(members, lo)


class GlobalTokensMask(Mask):
    """Longformer global tokens: a global position sees every key and is seen by every query.

    Positions are absolute sequence positions; queries are aligned bottom-right (query i is
    position i + Sk - Sq). Combine with ``|`` to add global tokens to a local pattern.
    """

    def __init__(self, indices):
        items = list(indices) if not isinstance(indices, (str, bytes)) else [indices]
        bad = [x for x in items if isinstance(x, bool) or not isinstance(x, int) and not (
            isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point())]
        if bad:
            raise TypeError(f"global token indices must be ints, got {bad[:3]!r}")
        idx = torch.as_tensor([int(x) for x in items], dtype=torch.int64)
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"global token indices must be >= 0, got min {int(idx.min())}")
        self.indices = torch.unique(idx)

    def __repr__(self):
        return f"global_tokens({self.indices.tolist()})"

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        i, j = _positions(seqlen_q, seqlen_k, q0, q1, k0, k1, device)
        g = self.indices.to(device)
        return (torch.isin(i, g) | torch.isin(j, g)).view(1, 1, q1 - q0, k1 - k0)

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        off = seqlen_k - seqlen_q
        q_hits = _ranges_hit(q_edges[:-1] + off, q_edges[1:] + off, self.indices)
        k_hits = _ranges_hit(k_edges[:-1], k_edges[1:], self.indices)
        q_all = q_hits == (q_edges[1:] - q_edges[:-1])
        k_all = k_hits == (k_edges[1:] - k_edges[:-1])
        any_hit = (q_hits > 0).unsqueeze(1) | (k_hits > 0).unsqueeze(0)
        kinds = torch.full((len(q_edges) - 1, len(k_edges) - 1), EMPTY, dtype=torch.int8)
        kinds[any_hit] = PARTIAL
        kinds[q_all.unsqueeze(1) | k_all.unsqueeze(0)] = FULL
        return kinds


def global_tokens(indices) -> GlobalTokensMask:
    """Longformer global tokens at these absolute positions: they see, and are seen by, all."""
    return GlobalTokensMask(indices)


class BlockLayoutMask(Mask):
    """A block-sparse layout: ``layout_fn(n_q_blocks, n_k_blocks) -> bool (nbq, nbk)`` says which
    (block_size x block_size) blocks are visible. Exact and cheap at tiles of ``block_size``."""

    def __init__(self, block_size: int, layout_fn, name: str):
        _check_int("block_size", block_size, 1)
        self.block_size, self.layout_fn, self.name = block_size, layout_fn, name
        self.preferred_block = block_size
        self._cache: dict = {}

    def __repr__(self):
        return self.name

    def layout(self, seqlen_q, seqlen_k) -> torch.Tensor:
        key = (seqlen_q, seqlen_k)
        if key not in self._cache:
            nbq = -(-seqlen_q // self.block_size)
            nbk = -(-seqlen_k // self.block_size)
            self._cache[key] = self.layout_fn(nbq, nbk).to(torch.bool)
        return self._cache[key]

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        lay = self.layout(seqlen_q, seqlen_k).to(device)
        bi = torch.arange(q0, q1, device=device) // self.block_size
        bj = torch.arange(k0, k1, device=device) // self.block_size
        return lay[bi][:, bj].view(1, 1, q1 - q0, k1 - k0)

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        lay = self.layout(seqlen_q, seqlen_k).to(torch.int32)
        # 2-D prefix sums: count visible layout blocks under each tile in O(1) per tile
        pre = torch.zeros(lay.shape[0] + 1, lay.shape[1] + 1, dtype=torch.int64)
        pre[1:, 1:] = lay.cumsum(0).cumsum(1)
        bs = self.block_size
        a0, a1 = q_edges[:-1] // bs, (q_edges[1:] - 1) // bs + 1
        b0, b1 = k_edges[:-1] // bs, (k_edges[1:] - 1) // bs + 1
        a0, a1, b0, b1 = a0.unsqueeze(1), a1.unsqueeze(1), b0.unsqueeze(0), b1.unsqueeze(0)
        count = pre[a1, b1] - pre[a0, b1] - pre[a1, b0] + pre[a0, b0]
        total = (a1 - a0) * (b1 - b0)
        kinds = torch.full(count.shape, PARTIAL, dtype=torch.int8)
        kinds[count == 0] = EMPTY
        kinds[count == total] = FULL
        return kinds


def bigbird(block_size: int, window_blocks: int = 3, global_blocks: int = 1, random_blocks: int = 2,
            seed: int = 0) -> BlockLayoutMask:
    """BigBird block-sparse attention: a sliding window of `window_blocks` blocks (centred),
    `global_blocks` leading blocks that see and are seen by all, and `random_blocks` random key
    blocks per query block (drawn from `seed`, the same on every call)."""
    for name, v, lo in (("window_blocks", window_blocks, 1), ("global_blocks", global_blocks, 0),
                        ("random_blocks", random_blocks, 0), ("seed", seed, 0)):
        _check_int(name, v, lo)

    def layout(nbq, nbk):
        off = nbk - nbq  # bottom-right alignment at block level
        i = torch.arange(nbq).unsqueeze(1) + off
        j = torch.arange(nbk).unsqueeze(0)
        lay = (j - i).abs() <= window_blocks // 2
        lay[:, :global_blocks] = True
        lay[(i < global_blocks).squeeze(1)] = True
        g = torch.Generator().manual_seed(seed)
        if random_blocks and nbk:
            picks = torch.rand(nbq, nbk, generator=g).argsort(dim=1)[:, :random_blocks]
            lay.scatter_(1, picks, True)
        return lay

    return BlockLayoutMask(block_size, layout,
                           f"bigbird({block_size}, {window_blocks}, {global_blocks}, {random_blocks}, {seed})")


class _CausalPatternMask(Mask):
    """Sparse Transformer patterns (causal): visible iff j <= i (bottom-right) and `pred(i, j)`."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name

    def pred(self, i, j):
        raise NotImplementedError

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        i, j = _positions(seqlen_q, seqlen_k, q0, q1, k0, k1, device)
        return ((j <= i) & self.pred(i, j)).view(1, 1, q1 - q0, k1 - k0)

    def tile_may_hit(self, qs, qe, ks, ke):
        """Bool (nQ, nK): can the pattern (ignoring causality) hit the tile? qs/qe/ks/ke: first/last positions."""
        raise NotImplementedError

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        off = seqlen_k - seqlen_q
        qs, qe = (q_edges[:-1] + off).unsqueeze(1), (q_edges[1:] - 1 + off).unsqueeze(1)
        ks, ke = k_edges[:-1].unsqueeze(0), (k_edges[1:] - 1).unsqueeze(0)
        kinds = torch.full((qs.shape[0], ks.shape[1]), EMPTY, dtype=torch.int8)
        hit = self.tile_may_hit(qs, qe, ks, ke) & (ks <= qe)   # some j <= i in the tile
        kinds[hit] = PARTIAL
        return kinds


class StridedMask(_CausalPatternMask):
    """Sparse Transformer 'strided': i sees j <= i if i - j < stride or (i - j) % stride == 0."""

    def __init__(self, stride):
        _check_int("stride", stride, 1)
        super().__init__(f"strided({stride})")
        self.stride = stride

    def pred(self, i, j):
        d = i - j
        return (d < self.stride) | (d % self.stride == 0)

    def tile_may_hit(self, qs, qe, ks, ke):
        lo = (qs - ke).clamp(min=0)   # smallest i - j >= 0 in the tile
        hi = qe - ks                  # largest
        local = lo < self.stride
        multiple = (hi // self.stride) * self.stride >= lo
        return (local | multiple) & (hi >= 0)


class FixedMask(_CausalPatternMask):
    """Sparse Transformer 'fixed': i sees j <= i in its own block of `block` positions, and the
    last `summary` positions of every block."""

    def __init__(self, block, summary):
        _check_int("block", block, 1)
        _check_int("summary", summary, 1)
        if summary > block:
            raise ValueError(f"summary ({summary}) must be <= block ({block})")
        super().__init__(f"fixed({block}, {summary})")
        self.block, self.summary = block, summary

    def pred(self, i, j):
        return (i // self.block == j // self.block) | (j % self.block >= self.block - self.summary)

    def tile_may_hit(self, qs, qe, ks, ke):
        same_block = (qs // self.block <= ke // self.block) & (ks // self.block <= qe // self.block)
        # a summary column lies in [ks, ke] unless the whole key range sits before the summary part of one block
        summary = ((ke - ks) >= self.block) | (ke % self.block >= self.block - self.summary) | (
            ks // self.block != ke // self.block)
        return same_block | summary


def strided(stride: int) -> StridedMask:
    """Sparse Transformer strided pattern (causal): j <= i and (i - j < stride or (i - j) % stride == 0)."""
    return StridedMask(stride)


def fixed(block: int, summary: int) -> FixedMask:
    """Sparse Transformer fixed pattern (causal): j <= i and (same block, or j among the last `summary` of its block)."""
    return FixedMask(block, summary)


class DocumentMask(Mask):
    """Block-diagonal packing: query and key are visible to each other iff they lie in the same
    document. ``seqlens`` are the document lengths; Sq == Sk == sum(seqlens)."""

    def __init__(self, seqlens):
        lens = [int(x) for x in seqlens]
        if not lens or any(x < 0 for x in lens):
            raise ValueError(f"document seqlens must be a non-empty list of lengths >= 0, got {lens}")
        self.seqlens = lens
        self.bounds = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0)

    def __repr__(self):
        return f"document({self.seqlens})"

    def _check(self, seqlen_q, seqlen_k):
        total = int(self.bounds[-1])
        if seqlen_q != total or seqlen_k != total:
            raise ValueError(f"document mask covers {total} tokens, used with (Sq, Sk) = ({seqlen_q}, {seqlen_k})")

    def _doc(self, pos):
        return torch.searchsorted(self.bounds.to(pos.device), pos, right=True) - 1

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        self._check(seqlen_q, seqlen_k)
        di = self._doc(torch.arange(q0, q1, device=device)).unsqueeze(1)
        dj = self._doc(torch.arange(k0, k1, device=device)).unsqueeze(0)
        return (di == dj).view(1, 1, q1 - q0, k1 - k0)

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        self._check(seqlen_q, seqlen_k)
        qa, qb = self._doc(q_edges[:-1]).unsqueeze(1), self._doc(q_edges[1:] - 1).unsqueeze(1)
        ka, kb = self._doc(k_edges[:-1]).unsqueeze(0), self._doc(k_edges[1:] - 1).unsqueeze(0)
        kinds = torch.full((qa.shape[0], ka.shape[1]), PARTIAL, dtype=torch.int8)
        kinds[(qb < ka) | (kb < qa)] = EMPTY
        kinds[(qa == qb) & (ka == kb) & (qa == ka)] = FULL
        return kinds


def document(seqlens) -> DocumentMask:
    """Block-diagonal mask for packed documents of these lengths (combine with causal() for LM packing)."""
    return DocumentMask(seqlens)


class MaskModMask(Mask):
    """Any ``fn(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's mask_mod), broadcasting over index tensors.

    Its block layout is evaluated once at ``block_size`` tiles, one tile at a time (O(block^2)
    memory, O(Sq * Sk) evaluations of a vectorised fn, as FlexAttention's create_block_mask),
    and cached as (Sq / block) x (Sk / block) kinds. `batch`/`heads` > 1 evaluate fn per batch/head.
    """

    def __init__(self, fn, seqlen_q, seqlen_k, block_size=128, batch=1, heads=1):
        if not callable(fn):
            raise TypeError(f"mask_mod must be callable, got {type(fn).__name__}")
        for name, v in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k), ("block_size", block_size),
                        ("batch", batch), ("heads", heads)):
            _check_int(name, v, 1)
        self.fn, self.seqlens, self.preferred_block = fn, (seqlen_q, seqlen_k), block_size
        self.batch, self.heads = batch, heads
        self._kinds = None

    def __repr__(self):
        return f"from_mask_mod({getattr(self.fn, '__name__', 'fn')}, {self.seqlens[0]}, {self.seqlens[1]})"

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        if (seqlen_q, seqlen_k) != self.seqlens:
            raise ValueError(f"mask_mod mask was built for (Sq, Sk) = {self.seqlens}, used with {(seqlen_q, seqlen_k)}")
        b = torch.arange(self.batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(self.heads, device=device).view(1, -1, 1, 1)
        i = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)
        j = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
        m = torch.as_tensor(self.fn(b, h, i, j), device=device)
        if m.dtype != torch.bool:
            raise TypeError(f"mask_mod must return bool, got {m.dtype}")
        return m.expand(self.batch, self.heads, q1 - q0, k1 - k0)

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        bs = self.preferred_block
        at_own_block = (torch.equal(q_edges, edges(seqlen_q, bs))
                        and torch.equal(k_edges, edges(seqlen_k, bs, seqlen_k - seqlen_q)))
        if not at_own_block:  # another tiling: evaluate afresh (not cached)
            return Mask.block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device)
        if self._kinds is None:
            self._kinds = Mask.block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device)
        return self._kinds.clone()


def from_mask_mod(fn, seqlen_q: int, seqlen_k: int, block_size: int = 128, batch: int = 1,
                  heads: int = 1) -> MaskModMask:
    """A mask from ``fn(b, h, q_idx, kv_idx) -> bool`` (tensors that broadcast), FlexAttention-style."""
    return MaskModMask(fn, seqlen_q, seqlen_k, block_size, batch, heads)
