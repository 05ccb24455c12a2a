"""The per-case contract and the classification of what a case did.

Outcomes: ``ok``; ``wrong`` (a result outside the FA rule, a NaN/inf pattern unlike the reference's, a valid
input refused, an invalid one accepted); ``unclear`` (an error that is not a ValueError/TypeError raised by
memattn naming the argument: anything raised from inside torch, or a message without the name); ``crash``
(the worker died: segfault, SIGFPE, abort, or a hang past the case timeout; recorded by the parent).
"""
from __future__ import annotations

import os
import re
import traceback

import torch

from conftest import amax, max_err

OK, WRONG, UNCLEAR, CRASH = "ok", "wrong", "unclear", "crash"
KINDS = (OK, WRONG, UNCLEAR, CRASH)

_MEMATTN_SRC = os.path.dirname(os.path.dirname(os.path.abspath(__import__("memattn").__file__)))


class Failure(Exception):
    """A contract violation found by a check: kind is WRONG or UNCLEAR."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def stored_p_floor(dtype: torch.dtype, v) -> float:
    """The out floor's extra term for a tile that stores its softmax weights P in a half-precision dtype before
    the P @ V product (PyTorch's fused CPU flash kernel does, as FlashAttention does on GPU): each weight moves by
    a relative u = eps / 2, so out_i = sum_j P_ij v_j by at most u * sum_j P_ij |v_j| <= u * max|v|. The naive run
    in that dtype rounds P too, but its rounding can cancel by chance (seen: a float16 naive error of 3e-7 where
    the tile's was 6e-5 and this term 7e-5), so the rule cannot rely on it. 0 for float32 and float64."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 0.0
    return torch.finfo(dtype).eps / 2 * amax(v)


def wrong(message):
    raise Failure(WRONG, message)


def _raised_by_memattn(exc: BaseException) -> bool:
    """True if the innermost frame of exc's traceback is memattn's own code (our validation raised it),
    False if it came from inside torch, numpy, the gguf package or Python's builtins."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(os.path.join(_MEMATTN_SRC, "memattn"))


def names_argument(message: str, names) -> bool:
    """True if `message` names one of `names` as a word (``k`` in "q, k, v must share a dtype", not in "keys")."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


_SIGNATURE = re.compile(r"unexpected keyword argument|missing \d+ required|takes \d+ positional")


def classify_error(exc: BaseException, expect, allowed_named=()) -> tuple[str, str]:
    """An exception a case raised -> (kind, message).

    expect: the argument names an invalid case corrupted (any may be named), or None for a valid case (which
    must not raise). Allowed: ValueError/TypeError (subclasses included) raised by memattn itself with one of
    the names in its message, or one of `allowed_named` (a documented error type) naming one; ``extra`` exception types a check declares (e.g. OutOfBlocksError) arrive here
    already filtered out."""
    msg = f"{type(exc).__name__}: {exc}"
    if allowed_named and isinstance(exc, allowed_named) and expect is not None:
        return (OK, "") if names_argument(str(exc), expect) else (UNCLEAR, f"message names none of {list(expect)}: {msg}")
    if not isinstance(exc, (ValueError, TypeError)):
        return UNCLEAR, f"not a ValueError/TypeError: {msg}\n{_where(exc)}"
    if isinstance(exc, TypeError) and _SIGNATURE.search(str(exc)) and expect is not None:
        # Python's own check of a call against memattn's signature (an unknown keyword, a missing argument)
        return (OK, "") if names_argument(str(exc), expect) else (UNCLEAR, f"message names none of {list(expect)}: {msg}")
    if not _raised_by_memattn(exc):
        return UNCLEAR, f"raised inside {_where(exc)} (not by memattn's validation): {msg}"
    if expect is None:
        return WRONG, f"a valid input was refused: {msg}"
    if not names_argument(str(exc), expect):
        return UNCLEAR, f"message names none of {list(expect)}: {msg}"
    return OK, ""


def _where(exc) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


# --------------------------------------------------------------------------------------------- comparisons

def _pattern(t):
    t = t.detach()
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def compare(name, ours, ref64, naive, *, floor, factor=2.0, nan_only_pattern=False, lse=False,
            within_pattern=False, inf_may_be_nan=False):
    """One output against the float64 reference.

    - shapes must agree (empty in, empty out);
    - NaN / +inf / -inf patterns must equal those of ref64 rounded to ours' dtype (rounding may overflow to
      inf in float16, as any float16 result of that value would);
    - finite entries: max|ours - ref64| <= factor * max|naive - ref64| + floor + u(T) max|ref64|, the naive
      error taken over entries where naive and ref64 are both finite; where the naive run in T overflowed
      (non-finite where the rounded reference is finite), the naive term is dropped: ours is held to the
      float64 reference rounded to T, within the floor.
    nan_only_pattern: compare only which entries are finite (gradients of a NaN query row: whether a NaN
    product there shows as NaN or inf depends on the order of the sums). lse: +inf and NaN are one class.
    within_pattern: ours may be non-finite only where ref64 is (dk, dv of a NaN query row: the reference's
    p_ij = exp(-inf - NaN) is NaN for keys the row cannot see too, so its NaN columns are a superset).
    inf_may_be_nan: an inf input a row sees through a weight that underflows in the path's precision (an
    ALiBi distance, a merge of partial results) gives 0 * inf = NaN where the float64 reference's weight
    stays positive and gives inf: both are accepted where the reference is +-inf. Finite stays finite.
    """
    if tuple(ours.shape) != tuple(ref64.shape):
        wrong(f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}")
    if ours.numel() == 0:
        return
    ours = ours.detach()
    ref_t = ref64.detach().to(ours.dtype)
    if within_pattern:
        want, got = ~torch.isfinite(ref64), ~torch.isfinite(ours)
        if bool((got & ~want).any()):
            bad = (got & ~want).nonzero()[:4].tolist()
            wrong(f"{name}: non-finite where the reference is finite, at {bad}")
        finite = ~want & ~got
    elif nan_only_pattern:
        want, got = ~torch.isfinite(ref64), ~torch.isfinite(ours)
        if not torch.equal(want, got):
            bad = (want != got).nonzero()[:4].tolist()
            wrong(f"{name}: non-finite pattern differs from the reference's at {bad}")
        finite = ~want
    else:
        if lse:  # +inf or NaN: both say "undefined" (a +inf score: out is NaN either way)
            ours, ref_t = (torch.where(torch.isposinf(t), float("nan"), t) for t in (ours, ref_t))
        if inf_may_be_nan:  # where the reference is +-inf, NaN is accepted too (see the docstring)
            ours = torch.where(torch.isnan(ours) & torch.isinf(ref_t), ref_t, ours)
        for what, a, r in zip(("NaN", "+inf", "-inf"), _pattern(ours), _pattern(ref_t)):
            if not torch.equal(a, r):
                bad = (a != r).nonzero()[:4].tolist()
                wrong(f"{name}: {what} pattern differs from the reference at {bad} "
                      f"(ours {int(a.sum())}, reference {int(r.sum())})")
        finite = torch.isfinite(ref_t)
    o, r = ours.double()[finite], ref64.detach().double()[finite]
    err = max_err(o, r)
    base = 0.0
    if naive is not None:
        nv = naive.detach().double()[finite]
        overflowed = not bool(torch.isfinite(nv).all())
        base = 0.0 if overflowed else max_err(nv, r)
    bound = factor * base + floor + torch.finfo(ours.dtype).eps / 2 * amax(r)
    if not err <= bound:
        wrong(f"{name}: error {err:.3e} > {factor} x naive {base:.3e} + floor {floor:.2e} (bound {bound:.3e})")
