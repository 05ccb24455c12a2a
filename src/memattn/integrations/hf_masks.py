"""transformers' mask builder for ``attn_implementation="memattn"``: a compact description, never (B, 1, Sq, Sk).

transformers builds one mask per forward (``create_causal_mask`` and friends) by calling the function registered
in ``AttentionMaskInterface`` with sizes, offsets, the 2-D padding mask and a ``mask_function`` closure
``fn(batch_idx, head_idx, q_idx, kv_idx) -> bool`` composed from its own pieces (``causal_mask_function``,
``sliding_window_overlay``, ``packed_sequence_mask_function``, ...). ``sdpa_mask`` evaluates that closure on the
whole (B, 1, Sq, Sk) grid. ``compact_mask`` instead returns a ``CompactMask``:

- the closures transformers composes for causal LMs are read back into structure: a (left, right) window on
  absolute positions (causal, sliding windows, bidirectional), the key padding (2-D ``attention_mask``) and the
  packed documents (the per-token document indices transformers derives from restarting ``position_ids``).
  Packed rows then run through ``memattn.attention_varlen`` (no tile pairs two documents), windows and padding
  through ``memattn.attention``'s own masks (empty tiles skipped);
- anything else (a user's ``and_mask_function``, chunked attention, offsets that do not line up bottom-right)
  becomes ``MaskFunctionTiles``: the closure evaluated one tile at a time by transformers' own ``sdpa_mask`` on
  that tile, empty tiles skipped, never the whole grid at once.

Reading closures depends on transformers' private composition (names and free variables of its inner functions,
as of transformers 5.x); anything not recognised exactly goes to the tile-by-tile path, which is right for any
index-based mask function, so a change in transformers costs speed, never correctness.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..masks import KeyPaddingMask, Mask, WindowMask, combine

# ------------------------------------------------------------------ the description handed to attention


def tighter_window(window: tuple, other: tuple) -> tuple:
    """The intersection of two (left, right) windows, -1 = unbounded on that side."""
    return tuple(b if a < 0 else (a if b < 0 else min(a, b)) for a, b in zip(window, other))


@dataclass(frozen=True)
class CompactMask:
    """What one transformers mask call describes, in O(B * S) memory.

    batch, q_length, kv_length: the sizes transformers asked for (attention checks q/k against them).
    window: (left, right) on bottom-right aligned positions, -1 = unbounded ((-1, 0) is causal, (-1, -1) none).
    key_padding: bool (B, kv_length), True = attend; None when no key is padding.
    documents: int64 (B, Sq) document index per token (non-decreasing in a row), Sq == Sk; None when unpacked.
    tiles: a ``memattn.masks.Mask`` evaluating the whole mask function tile by tile (then window, key_padding
        and documents are unused); None when the structure above is exact.
    """

    batch: int
    q_length: int
    kv_length: int
    window: tuple = (-1, -1)
    key_padding: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    tiles: Mask | None = None

    # transformers' code only ever passes the mask on; these keep a stray `mask.shape`/`mask.dim()` honest
    @property
    def shape(self):
        return (self.batch, 1, self.q_length, self.kv_length)

    def dim(self) -> int:
        return 4

    def check(self, seqlen_q: int, seqlen_k: int) -> None:
        if (seqlen_q, seqlen_k) != (self.q_length, self.kv_length):
            raise ValueError(f"the mask was built for (Sq, Sk) = ({self.q_length}, {self.kv_length}), "
                             f"attention got ({seqlen_q}, {seqlen_k})")

    def as_mask(self, window: tuple = (-1, -1)) -> Mask | None:
        """One ``memattn.masks`` object for ``memattn.attention`` (documents excepted: see ``cu_seqlens``);
        `window` (left, right) is intersected with the mask's own (a module's sliding window)."""
        if self.tiles is not None:
            return self.tiles
        window = tighter_window(self.window, window)
        window = None if window == (-1, -1) else WindowMask(*window)
        padding = None if self.key_padding is None else KeyPaddingMask(self.key_padding)
        return combine(window, padding)

    @functools.cached_property   # one mask serves every layer of a forward
    def cu_seqlens(self) -> torch.Tensor:
        """int32 (documents + 1,) boundaries of every document of every row, rows laid end to end."""
        docs = self.documents
        b, s = docs.shape
        starts = torch.ones(b, s, dtype=torch.bool, device=docs.device)
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
        idx = torch.nonzero(starts.reshape(-1)).squeeze(1)
        total = torch.tensor([b * s], device=docs.device)
        return torch.cat([idx, total]).to(torch.int32).cpu()

    def __repr__(self):
        parts = [f"window={self.window}"]
        if self.key_padding is not None:
            parts.append(f"key_padding={tuple(self.key_padding.shape)}")
        if self.documents is not None:
            parts.append(f"documents={int(self.documents.max()) + 1 if self.documents.numel() else 0}/row")
        if self.tiles is not None:
            parts = ["tiles=mask_function"]
        return f"CompactMask({self.batch}, {self.q_length}, {self.kv_length}, {', '.join(parts)})"


# ------------------------------------------------------------------ the generic path: tile by tile


class MaskFunctionTiles(Mask):
    """A transformers ``mask_function`` (with its padding) as a memattn mask, evaluated one tile at a time.

    Each tile asks transformers' own ``sdpa_mask`` for a (B, 1, tq, tk) block at the tile's offsets, so the
    semantics are transformers' exactly. Tile kinds are cached per tiling: one mask serves every layer.
    """

    def __init__(self, mask_function, *, batch, q_length, kv_length, q_offset, kv_offset, padding, use_vmap):
        self.fn, self.batch, self.use_vmap = mask_function, batch, use_vmap
        self.seqlens, self.offsets, self.padding = (q_length, kv_length), (q_offset, kv_offset), padding
        self._kinds: dict = {}

    def __repr__(self):
        return f"mask_function({getattr(self.fn, '__qualname__', 'fn')}, {self.seqlens})"

    def element_mask(self, seqlen_q, seqlen_k, q0, q1, k0, k1, device=None):
        from transformers.masking_utils import sdpa_mask

        if (seqlen_q, seqlen_k) != self.seqlens:
            raise ValueError(f"mask built for (Sq, Sk) = {self.seqlens}, used with ({seqlen_q}, {seqlen_k})")
        qo, ko = self.offsets
        return sdpa_mask(batch_size=self.batch, q_length=q1 - q0, kv_length=k1 - k0, q_offset=qo + q0,
                         kv_offset=ko + k0, mask_function=self.fn, attention_mask=self.padding,
                         allow_is_causal_skip=False, use_vmap=self.use_vmap, device=device or "cpu")

    def block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device=None):
        key = (seqlen_q, seqlen_k, tuple(q_edges.tolist()), tuple(k_edges.tolist()))
        if key not in self._kinds:
            self._kinds[key] = Mask.block_kinds(self, seqlen_q, seqlen_k, q_edges, k_edges, device)
        return self._kinds[key].clone()


# ------------------------------------------------------------------ reading transformers' closures


class _Unknown(Exception):
    """A closure this reader does not know: the caller takes the tile-by-tile path."""


@dataclass
class _Parts:
    """An AND of recognised pieces on absolute positions (q_abs = q_offset + i, kv_abs = kv_offset + j):
    kv_abs - q_abs in [-left, right] (-1 = unbounded), a key padding, document indices."""

    left: int = -1
    right: int = -1
    padding: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    remapped: bool = False   # a window read through packed positions (exact only within documents)

    def bound(self, left=-1, right=-1):
        self.left, self.right = tighter_window((self.left, self.right), (left, right))


def _free_vars(fn) -> dict:
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _read(fn, parts: _Parts, mu) -> None:
    """Fold the closure `fn` into `parts` (an AND), or raise _Unknown."""
    if fn is mu.causal_mask_function:
        return parts.bound(right=0)
    if fn is mu.bidirectional_mask_function:
        return None
    name = getattr(fn, "__qualname__", "")
    free = _free_vars(fn) if getattr(fn, "__code__", None) is not None else {}
    if name == "and_masks.<locals>.and_mask":
        for part in free["mask_functions"]:
            _read(part, parts, mu)
        return None
    if name == "sliding_window_overlay.<locals>.inner_mask":       # kv > q - w
        return parts.bound(left=int(free["sliding_window"]) - 1)
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":   # |q - kv| <= w
        w = int(free["sliding_window"])
        return parts.bound(left=w, right=w)
    if name == "padding_mask_function.<locals>.inner_mask":
        pad = free["padding_mask"]
        parts.padding = pad if parts.padding is None else parts.padding & pad
        return None
    if name == "packed_sequence_mask_function.<locals>.inner_mask" and parts.documents is None:
        parts.documents = free["packed_sequence_mask"]
        return None
    if name == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        # fn(q, kv) read at packed positions: within one document positions advance by one per token, so a
        # window on positions is the same window on indices there; the document part must then be present.
        inner = _Parts()
        _read(free["mask_function"], inner, mu)
        if inner.padding is not None or inner.documents is not None:
            raise _Unknown(name)
        parts.bound(inner.left, inner.right)
        parts.remapped = True
        return None
    raise _Unknown(name or repr(fn))


def describe(mask_function, *, batch, q_length, kv_length, q_offset, kv_offset, attention_mask, use_vmap=False):
    """The ``CompactMask`` of one transformers mask call (arguments as ``sdpa_mask``'s)."""
    import transformers.masking_utils as mu

    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset)
    if isinstance(kv_offset, torch.Tensor):
        kv_offset = int(kv_offset)
    tiles = CompactMask(batch, q_length, kv_length, tiles=MaskFunctionTiles(
        mask_function, batch=batch, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, padding=padding, use_vmap=use_vmap))   # the answer whenever the structure is not exact
    parts = _Parts()
    try:
        _read(mask_function, parts, mu)
    except _Unknown:
        return tiles
    # memattn's windows are bottom-right aligned: kv_abs - q_abs = j - i - (Sk - Sq) needs q_off - kv_off = Sk - Sq
    if q_offset - kv_offset != kv_length - q_length:
        return tiles
    if parts.remapped and parts.documents is None:
        return tiles
    if parts.documents is not None and (q_offset or kv_offset or q_length != kv_length or padding is not None
                                        or parts.padding is not None or tuple(parts.documents.shape) != (batch, q_length)):
        return tiles
    key_padding = None
    for pad in (padding, parts.padding):
        if pad is not None:
            pad = pad[:, kv_offset:kv_offset + kv_length].to(torch.bool)
            key_padding = pad if key_padding is None else key_padding & pad
    if key_padding is not None and bool(key_padding.all()):
        key_padding = None
    if key_padding is not None and tuple(key_padding.shape) != (batch, kv_length):
        return tiles
    return CompactMask(batch, q_length, kv_length, window=(parts.left, parts.right), key_padding=key_padding,
                       documents=parts.documents)


def compact_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 use_vmap=False, **kwargs) -> CompactMask:
    """The ``AttentionMaskInterface`` function registered for "memattn": transformers' mask arguments in, a
    ``CompactMask`` out (O(B * S) memory whatever the pattern)."""
    import transformers.masking_utils as mu

    return describe(mask_function or mu.causal_mask_function, batch=batch_size, q_length=q_length,
                    kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                    use_vmap=use_vmap)


__all__ = ["CompactMask", "MaskFunctionTiles", "compact_mask", "describe", "tighter_window"]
