"""KV storage formats: full width, int8 / fp8 with scales, KIVI 4/2-bit, behind one interface the kernels read.

A format is a ``KVFormat`` record (``FORMATS[name]``). The quantized ones store, for every block of
``block_size`` tokens, integer *codes* plus the numbers that turn them back into keys and values:

- ``int8``, ``fp8_e4m3``: symmetric, one float32 scale per (token, kv head): value = code * scale, with
  scale = max|x| / 127 (int8) or max|x| / 448 (fp8 e4m3, whose largest finite value is 448).
- ``int4``, ``int2`` (KIVI, Liu et al. 2024): asymmetric, value = code * scale + zero, codes in
  [0, 2^bits - 1] packed 2 or 4 to a byte. Keys are quantized *per channel* (their outlier channels get
  their own range), one float16 (scale, zero) per (block, kv head, channel) over the block's tokens;
  values *per token*, one float16 (scale, zero) per (token, kv head). A block's key statistics need the
  whole block, so each sequence's last, partial block stays in full precision (the *residual* window)
  until it fills, and is quantized then (``PagedKVCache`` keeps the residual blocks).

Error bounds (tests check them; x a group's values, r = max x - min x):
  int8: |x - deq| <= max|x| / 254; fp8: <= |x| / 16 + max|x| / 448 * 2^-10 (3 mantissa bits, subnormals);
  KIVI b bits: <= r / (2^b - 1) / 2 + 2^-10 * max|x| (float16 rounding of scale and zero).

``QuantizedPages`` is one layer's keys or values in a quantized format: what ``paged_attention`` and the
decode kernels take in place of a full-width ``(num_blocks, block_size, kv_heads, head_dim)`` tensor.
Its ``index_select(0, ids)`` dequantizes the named blocks (the readable reference, and what the gather
and prefill schedules read per tile); the native kernel reads its codes and scales in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class KVFormat:
    """A KV storage format. name: the ``kv_cache_dtype`` value. bits: of one code (0: full width).
    kivi: asymmetric KIVI (keys per channel, values per token, a residual block) rather than symmetric
    per-token scales. code_dtype: the stored element type of the codes (fp8 codes are stored as their
    uint8 bit patterns: PyTorch's CPU indexing kernels do not take float8). pack: codes per stored element."""

    name: str
    bits: int
    kivi: bool = False
    code_dtype: torch.dtype | None = None
    pack: int = 1

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def levels(self) -> int:
        """Largest code of a KIVI format (2^bits - 1)."""
        return (1 << self.bits) - 1

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.pack:
            raise ValueError(f"kv_dtype {self.name!r} packs {self.pack} codes per byte: head_dim {head_dim} "
                             f"must be a multiple of {self.pack}")

    def bytes_per_token(self, kv_heads: int, head_dim: int, block_size: int, dtype=torch.float32) -> float:
        """Bytes one token takes in one layer's keys and values together, scales and zero points included
        (`dtype`: the full-width element type, for "auto"). KIVI's key statistics are per block, so they
        are spread over the block's tokens; its residual block (one per sequence) is not counted here."""
        n = kv_heads * head_dim
        if not self.quantized:
            return 2.0 * n * torch.empty((), dtype=dtype).element_size()
        codes = 2.0 * n / self.pack
        if not self.kivi:
            return codes + 2 * kv_heads * 4  # a float32 scale per (token, kv head), keys and values
        keys_meta = 2 * 2 * n / block_size  # float16 (scale, zero) per (block, head, channel)
        values_meta = 2 * 2 * kv_heads  # float16 (scale, zero) per (token, head)
        return codes + keys_meta + values_meta


FORMATS = {f.name: f for f in (
    KVFormat("auto", 0),
    KVFormat("int8", 8, code_dtype=torch.int8),
    KVFormat("fp8_e4m3", 8, code_dtype=torch.uint8),
    KVFormat("int4", 4, kivi=True, code_dtype=torch.uint8, pack=2),
    KVFormat("int2", 2, kivi=True, code_dtype=torch.uint8, pack=4),
)}
QUANTIZED = tuple(n for n, f in FORMATS.items() if f.quantized)


def kv_format(name) -> KVFormat:
    """The record of a ``kv_dtype`` / ``kv_cache_dtype`` value; ValueError for anything else."""
    if isinstance(name, KVFormat):
        return name
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"kv_dtype must be one of {list(FORMATS)}, got {name!r}")
    return FORMATS[name]


def bytes_per_token(name: str, *, num_layers: int, kv_heads: int, head_dim: int, block_size: int = 16,
                    dtype=torch.float32) -> float:
    """KV bytes per token of a model (all layers, keys and values, scales included) in format `name`."""
    return num_layers * kv_format(name).bytes_per_token(kv_heads, head_dim, block_size, dtype)


def residual_bytes(name: str, residual_blocks: int, *, num_layers: int, kv_heads: int, head_dim: int,
                   block_size: int = 16) -> int:
    """Bytes of a KIVI pool's float32 residual blocks (0 for the other formats)."""
    if not kv_format(name).kivi:
        return 0
    return residual_blocks * 2 * num_layers * block_size * kv_heads * head_dim * 4


def pool_blocks(name: str, budget_bytes: int, *, num_layers: int, kv_heads: int, head_dim: int, block_size: int = 16,
                residual_blocks: int = 0, dtype=torch.float32) -> int:
    """Blocks a KV budget of `budget_bytes` holds in format `name`, after KIVI's `residual_blocks` (what
    ``LLM`` allocates for ``kv_cache_memory``; may be <= 0 when the budget holds none)."""
    geometry = dict(num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size)
    per_block = round(bytes_per_token(name, dtype=dtype, **geometry) * block_size)
    return (budget_bytes - residual_bytes(name, residual_blocks, **geometry)) // per_block


# ---------------------------------------------------------------- codes

def pack(codes: torch.Tensor, per_byte: int) -> torch.Tensor:
    """uint8 codes (..., D) of 8 / per_byte bits -> (..., D / per_byte) bytes; code i of a byte's group
    sits at bits (i * 8 / per_byte) upward (the low nibble holds the even channel)."""
    if per_byte == 1:
        return codes
    bits = 8 // per_byte
    c = codes.to(torch.uint8).view(*codes.shape[:-1], -1, per_byte)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, per_byte: int) -> torch.Tensor:
    """Inverse of ``pack``: (..., D / per_byte) bytes -> uint8 codes (..., D)."""
    if per_byte == 1:
        return packed
    bits = 8 // per_byte
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, -1).flatten(-2)


def quantize_symmetric(x: torch.Tensor, fmt: KVFormat):
    """x (..., D) -> codes (..., D) of fmt.code_dtype, float32 scale (...,): one scale per row (token, head)."""
    xf = x.to(torch.float32)
    top = 127.0 if fmt.name == "int8" else FP8_MAX
    scale = xf.abs().amax(-1) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    y = (xf / safe).clamp_(-top, top)
    codes = y.round_().to(torch.int8) if fmt.name == "int8" else y.to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scale


def code_values(codes: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Stored codes -> their float32 values before scaling (unpacked for KIVI)."""
    if fmt.name == "fp8_e4m3":
        return codes.view(torch.float8_e4m3fn).to(torch.float32)
    return unpack(codes, fmt.pack).to(torch.float32)


def quantize_asymmetric(x: torch.Tensor, bits: int, dim: int):
    """KIVI's quantizer over `dim` (a group): x -> uint8 codes in [0, 2^bits - 1] shaped like x, and float16
    scale, zero (x's shape without `dim`), with x ~ codes * scale + zero. The float16-rounded scale and zero
    are the ones the codes are computed against, so dequantization sees exactly what was rounded."""
    xf = x.to(torch.float32)
    lo, hi = xf.amin(dim), xf.amax(dim)
    levels = (1 << bits) - 1
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / levels).to(torch.float16)
    s = scale.float().unsqueeze(dim)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = ((xf - zero.float().unsqueeze(dim)) / safe).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


# ---------------------------------------------------------------- one layer's keys or values

class QuantizedPages:
    """One layer's keys (side "k") or values (side "v") in a quantized format, read in place.

    Shapes, N blocks of bs tokens, Hkv heads, D channels, P = fmt.pack:
      codes (N, bs, Hkv, D / P) of fmt.code_dtype;
      int8 / fp8: scale float32 (N, bs, Hkv), zero None;
      KIVI keys: scale, zero float16 (N, Hkv, D) (per channel over the block's tokens);
      KIVI values: scale, zero float16 (N, bs, Hkv) (per token);
      KIVI: residual float32 (R, bs, Hkv, D) and residual_map int32 (N,): block p is held at full precision
      in residual[residual_map[p]] while residual_map[p] >= 0 (its codes are then stale); else None.
    dtype: what reads dequantize to (the model's dtype). ``shape`` is the full-width cache's shape.
    """

    def __init__(self, fmt: KVFormat, side: str, codes, scale, zero=None, residual=None, residual_map=None,
                 *, dtype=torch.float32):
        self.format, self.side, self.codes, self.scale, self.zero = fmt, side, codes, scale, zero
        self.residual, self.residual_map, self.dtype = residual, residual_map, dtype
        n, bs, hkv, dc = codes.shape
        self.shape = torch.Size((n, bs, hkv, dc * fmt.pack))
        self.device = codes.device

    def dim(self) -> int:
        return 4

    def dequantize_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Blocks `ids` (n,) from their codes alone (residual ignored): float32 (n, bs, Hkv, D)."""
        f = self.format
        c = code_values(self.codes.index_select(0, ids), f)
        if not f.kivi:
            return c * self.scale.index_select(0, ids).unsqueeze(-1)
        s, z = self.scale.index_select(0, ids).float(), self.zero.index_select(0, ids).float()
        if self.side == "k":  # per channel: (n, Hkv, D) broadcast over the block's tokens
            return c * s.unsqueeze(1) + z.unsqueeze(1)
        return c * s.unsqueeze(-1) + z.unsqueeze(-1)

    def index_select(self, dim: int, ids: torch.Tensor) -> torch.Tensor:
        """Blocks `ids` dequantized, residual blocks read at full precision: (n, bs, Hkv, D) in ``dtype``.
        (``Tensor.index_select`` on a full-width cache; the gather and prefill schedules call this.)"""
        if dim != 0:
            raise ValueError("quantized pages are selected by block (dim 0) only")
        ids = ids.to(device=self.device, dtype=torch.int64)
        out = self.dequantize_codes(ids)
        if self.residual_map is not None:
            slot = self.residual_map.index_select(0, ids).to(torch.int64)
            held = slot >= 0
            if bool(held.any()):
                out[held] = self.residual.index_select(0, slot[held]).to(out.dtype)
        return out.to(self.dtype)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The whole layer as a full-width (N, bs, Hkv, D) tensor (tests' oracle input)."""
        out = self.index_select(0, torch.arange(self.shape[0], device=self.device))
        return out.to(dtype or self.dtype)


__all__ = ["KVFormat", "FORMATS", "QUANTIZED", "kv_format", "bytes_per_token", "residual_bytes", "pool_blocks", "QuantizedPages", "pack", "unpack",
           "quantize_symmetric", "quantize_asymmetric", "code_values", "FP8_MAX"]
