"""Shared test helpers: random inputs, FlashAttention's tolerance rule and its floor.

Test files map one-to-one to the modules (or packages) of ``src/memattn`` they test, by name
(tests/README.md has the table).
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter. The variable must be set before the
# first import of triton anywhere in the session (transformers and torch.compile import it too),
# so it is set here, when pytest loads this file, not in the Triton test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# 2-core CI: keep intra-op threads at the machine's size, and never let a test inherit a
# seed from another (fresh seeds per test, printed on failure through the test id/params).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# ---------------------------------------------------------------- the floor of the FA rule

C_FLOOR = 2.0
"""The constant c of `fa_floor` (see there): about five standard deviations of the rounding model."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a path accumulates in: float64 for float64 inputs, float32 for every other float dtype
    (bfloat16 and float16 inputs are accumulated in float32 by every path: tiles, BLAS, the C kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fa_floor(dtype: torch.dtype, term: float, n: int, c: float = C_FLOOR) -> float:
    """Forward-error floor of a sum of `n` terms, each of magnitude <= `term`, computed in `dtype`:

        floor = c * eps(compute_dtype(dtype)) * term * sqrt(n)

    Derivation (probabilistic rounding-error analysis, Higham & Mary, SIAM J. Sci. Comput. 2019):
    every floating-point operation returns x (1 + d) with |d| <= u = eps / 2, the d independent with
    mean zero. A sum of n terms evaluated in any order (sequential, pairwise, SIMD lanes, tiles merged
    afterwards) commits at most 2n such roundings (a product and an addition per term), each an error
    d * x of a term or running sum x. Where every such x is bounded by `term` (the running sums of the
    attention sums are softmax-weighted averages, or random-sign sums that stay below the bound of
    their largest term, which is a product of the operands' maxima), the error is a sum of 2n
    independent mean-zero variables |d x| <= u * term. Its standard deviation is at most
    u * term * sqrt(2n / 3) (d uniform on [-u, u]), so `floor` is 2c / sqrt(2/3) = 2.45c standard
    deviations: c = 2 puts it 4.9 sigma out, for terms that all sit at the largest magnitude (the
    terms of random operands mostly sit well below it). Nothing here depends on the machine: a
    different vector width or summation order changes which roundings happen, not their number or
    size, which is why the floor, not one CPU's observed error, sets what "rounding" means.

    The error grows with the operands of the sum, not with its result: the one-key backward
    (the Intel failure of issue 12) has dk = 0 exactly, yet the computed dk is a sum of
    scale * dS_ij * q_i whose dS_ij = dP_ij - delta_i are two rounded D-term dot products of dO
    and V; see `attention_floors` for how each quantity's terms are bounded.

    The floor is for the path's accumulation dtype; rounding of a bfloat16/float16 *result* is
    added by `assert_fa_rule` (u(T) * max|ref|), and the float64 oracle's own rounding (the same
    formula in float64) is added here, so float64 paths get a tight bound of the same form.
    """
    if n <= 0 or term == 0:
        return 0.0
    eps = torch.finfo(compute_dtype(dtype)).eps + torch.finfo(torch.float64).eps
    return c * eps * term * math.sqrt(n)


def amax(t) -> float:
    """max |t| over finite entries (0 for None or empty)."""
    if t is None:
        return 0.0
    t = torch.as_tensor(t).detach()
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def max_row_norm(t) -> float:
    """The largest 2-norm of t's last-dim rows over finite rows (0 for None or empty)."""
    if t is None or t.numel() == 0:
        return 0.0
    norms = t.detach().double().norm(dim=-1)
    return amax(norms)


def attention_floors(q, k, v, dout=None, dlse=None, *, scale=None, bias=None, keys=None, rows=None,
                     c: float = C_FLOOR) -> dict:
    """`fa_floor` for each quantity of softmax attention, from its operands; keys: "out", "lse", "dq",
    "dk", "dv" and, for comparisons without a naive run, "out_alone", "dq_alone", "dk_alone", "dv_alone"
    (the gradient floors need dout, the cotangent of out; dlse, that of lse, if any).

    q (..., H, D), k and v (..., Hkv, D) in any layout (dense, packed, paged caches): only their
    dtype, maxima and head_dim are read. `keys` is the most keys one query row sums over (default
    k.shape[-3]); `rows` the most (query row, head) pairs one key's gradient sums over (default
    q.shape[-3] * H / Hkv). bias: the largest |bias| added to a score (ALiBi, dense bias), or a tensor.

    Term magnitudes (Mx = max|x|, s = the softmax scale, P <= 1 the probabilities):
      scores  s_ij = s q_i.k_j (+ bias)       D terms   of s Mq Mk
      lse     m + log sum_j exp(s_ij - m)     Sk terms  of 1 (relative: log turns them absolute), plus
                                                        the scores' own floor (d lse / d s_ij = P_ij)
      out     sum_j P_ij v_j                  Sk terms  of Mv (a weighted average: running sums <= Mv)
      dP      dO_i . v_j, delta_i = dO_i.O_i  D terms; by Cauchy-Schwarz |dP_ij| <= |dO_i| |v_j| and
                                                        |delta_i| <= |dO_i| max_j |v_j| (O_i is an average
                                                        of the v_j), so |dS_ij| = P |dP - delta + dlse|
                                                        <= B := 2 Ndo Nv + Mdlse (Nx = the largest row
                                                        2-norm of x); B also bounds the errors of dS in
                                                        units of eps (FA-2 forms delta from O, the naive
                                                        backward from P dP: where dS is exactly 0 the two
                                                        still differ)
      dq_i    s sum_j dS_ij k_j               Sk terms  of s B Mk
      dk_j    s sum_i dS_ij q_i               rows      of s B Mq
      dv_j    sum_i P_ij dO_i                 rows      of Mdo

    These floors cover the sums a path evaluates in an order or form of its own. The rounding of the
    scores (and of the softmax sum) carried through the softmax is common to the path and the naive run
    in T (the same formula), so it shows in the naive error, which the rule multiplies by 2 or 3. Where
    no naive run exists (float64 paths, a max error reported by the CLI) the "*_alone" entries add it:
    a score or lse error d moves P_ij by P_ij (d_ij - sum_k P_ik d_ik), relative error <= 2 max|d| with
    max|d| <= lse's floor, so out_i moves by <= 2 Mv max|d|, dq_i by s Mk B 2 max|d| (P-weighted), dk_j
    and dv_j by sqrt(rows) times s Mq B 2 max|d| and Mdo 2 max|d| (independent across rows).
    """
    dt = q.dtype
    d = q.shape[-1]
    h, hkv = q.shape[-2], k.shape[-2]
    sk = k.shape[-3] if keys is None else keys
    nq = q.shape[-3] * (h // hkv) if rows is None else rows
    s = d ** -0.5 if scale is None else scale
    mq, mk, mv = amax(q), amax(k), amax(v)
    mb = amax(bias) if torch.is_tensor(bias) else float(bias or 0.0)
    score = fa_floor(dt, s * mq * mk, d, c) + fa_floor(dt, mb, 1, c)
    out = {"out": fa_floor(dt, mv, sk, c), "lse": fa_floor(dt, 1.0, sk, c) + score}
    # With no naive run to compare with, the whole forward error of out: the scores' and the softmax
    # sum's rounding (lse's floor) moves out_i by sum_j P_ij (v_j - out_i) d_ij <= 2 Mv max|d|.
    out["out_alone"] = out["out"] + 2 * mv * out["lse"]
    if dout is not None:
        b = 2 * max_row_norm(dout) * max_row_norm(v) + amax(dlse)
        out.update(dq=fa_floor(dt, s * b * mk, sk, c), dk=fa_floor(dt, s * b * mq, nq, c),
                   dv=fa_floor(dt, amax(dout), nq, c))
        p_rel = 2 * out["lse"]
        out.update(dq_alone=out["dq"] + s * mk * b * p_rel, dk_alone=out["dk"] + math.sqrt(nq) * s * mq * b * p_rel,
                   dv_alone=out["dv"] + math.sqrt(nq) * amax(dout) * p_rel)
    return out


def linear_floors(q, k, v, init, weights, *, causal: bool, c: float = C_FLOOR) -> dict:
    """`fa_floor` for each quantity of elu linear attention (feature map elu + 1, normalised) and of its
    gradients through the loss sum(out * w_out) + sum(kv * w_kv) + sum(z * w_z); keys "out", "kv", "z",
    "dq", "dk", "dv", "dkv0", "dz0".

    q (B, Sq, H, D), k, v (B, Sk, Hkv, D), init = (kv0, z0) (B, H, D, D), (B, H, D) or None, weights =
    (w_out, w_kv, w_z). Only their dtype and values are read; the magnitudes are evaluated in float64.

    Every quantity is a nested sum over tokens (S of them, plus the initial state) and features (D),
    and the gradients also over the value dimension (D plus the normaliser's column): each level is a
    sum whose running sums are bounded by the same nonnegative "absolute" expansion A of the quantity,
    so level k adds c eps sqrt(n_k) A, and the floor is the sum over levels of fa_floor(dtype, A, n_k).
    A is computed by running the textbook formula on magnitudes: the features phi = elu + 1 are already
    >= 0, v, kv0 and the weights enter as |v|, |kv0|, |w|, and the division out = y / den, whose
    derivative in den is negative, as y / den + |y| den / den^2 at fixed den (the same gradient
    magnitudes, with the sign of the den path made positive). For out itself A = (y_abs + |y|) / den:
    the numerator's running sums over den plus |out| times den's relative error.
    """
    dt = q.dtype
    b, _, h, d = q.shape
    s = k.shape[1]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = h // k.shape[2]
    kv0 = (torch.zeros(b, h, d, d, dtype=torch.float64) if init is None else init[0].detach().double().abs())
    z0 = (torch.zeros(b, h, d, dtype=torch.float64) if init is None else init[1].detach().double().abs())
    kv0.requires_grad_()
    z0.requires_grad_()
    w_out, w_kv, w_z = (w.detach().double().abs() for w in weights)
    fq = torch.nn.functional.elu(q64).add(1).transpose(1, 2)    # (B, H, S, D)
    fk = torch.nn.functional.elu(k64).add(1).repeat_interleave(rep, 2).transpose(1, 2)
    va = v64.abs().repeat_interleave(rep, 2).transpose(1, 2)
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a.tril()
    y_abs = a @ va + fq @ kv0
    den = a.sum(-1, keepdim=True) + fq @ z0.unsqueeze(-1)
    y_signed = (a @ v64.detach().repeat_interleave(rep, 2).transpose(1, 2) + fq @ kv0).detach().abs()
    den0 = den.detach()
    out_abs = y_abs / den0 + y_signed * den / den0 ** 2
    kv = kv0 + fk.transpose(-1, -2) @ va
    z = z0 + fk.sum(-2)
    loss = (out_abs.transpose(1, 2) * w_out).sum() + (kv * w_kv).sum() + (z * w_z).sum()
    leaves = [q64, k64, v64] + ([kv0, z0] if init is not None else [])
    g = torch.autograd.grad(loss, leaves)
    mag = {"out": ((y_abs + y_signed) / den0).max().item(), "kv": kv.max().item(), "z": z.max().item(),
           **{f"d{n}": t.abs().max().item() for n, t in zip(["q", "k", "v", "kv0", "z0"], g)}}
    tokens, feats, vals = s + 1, d, d + 1
    levels = {"out": (tokens, feats), "kv": (tokens,), "z": (tokens,)}
    if rep > 1:  # a kv head's gradient also sums over the query heads that read it
        levels.update(dk=(tokens, feats, vals, rep), dv=(tokens, feats, vals, rep))
    return {n: sum(fa_floor(dt, m, lv, c) for lv in levels.get(n, (tokens, feats, vals))) for n, m in mag.items()}


def rand_qkv(b, sq, sk, h, hkv, d, dtype=torch.float32, seed=0, requires_grad=True):
    """Random q (b, sq, h, d), k/v (b, sk, hkv, d) in float64, plus copies in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q64 = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    k64 = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v64 = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    low = [t.to(dtype) for t in (q64, k64, v64)]
    # the float64 oracle sees exactly the values the low-precision path sees
    high = [t.double() for t in low]
    if requires_grad:
        for t in low + high:
            t.requires_grad_(True)
    return high, low


def max_err(a, b):
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    return (a - b).masked_fill(both_inf, 0).abs().max().item() if a.numel() else 0.0


def assert_fa_rule(name, ours, ref64, naive, *, floor, factor=2.0, seed=None):
    """FlashAttention's rule: max|ours - ref64| <= factor * max|naive_T - ref64| + floor + u(T) * max|ref64|.

    `floor` comes from `fa_floor` / `attention_floors` (the accumulation's rounding, derived from the
    operands); u(T) * max|ref64| is the rounding of the result to its dtype T (half an ulp, u = eps / 2).
    naive=None: no naive run in T exists (a float64 path against the float64 oracle): err <= floor + ...
    `seed` goes into the failure message, so a failure reproduces."""
    err = max_err(ours, ref64)
    base = 0.0 if naive is None else max_err(naive, ref64)
    bound = factor * base + floor + torch.finfo(ours.dtype).eps / 2 * amax(ref64)
    where = "" if seed is None else f" (seed {seed})"
    assert err <= bound, (f"{name}: error {err:.3e} > {factor} x naive error {base:.3e} + floor {floor:.2e}"
                          f" (bound {bound:.3e}){where}")


def cotangents(outputs, seed=123):
    """The seeded cotangents `grads` uses, one per output, in each output's dtype."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outputs]


def grads(outputs, inputs, seed=123):
    """Gradients of sum(out * dout) (+ sum(lse * dlse) if lse is given) with seeded cotangents."""
    loss = 0
    for o, cot in zip(outputs, cotangents(outputs, seed)):
        loss = loss + (torch.where(torch.isinf(o), torch.zeros_like(o), o) * cot).sum()
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors: on a shared 2-core machine OpenMP hand-offs cost
    more than they save (linear attention's recurrent form's 1000 tiny steps ran 30x slower with 2 threads
    under load). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seed(request):
    """A fresh seed per test, stable across runs so a failure reproduces."""
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)
