"""Chunked LM-head cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without the N x V logits.

A causal LM's last step turns N hidden states (N, H) into logits (N, V) and takes their cross-entropy.
With V in the tens of thousands the logits dominate training memory: transformers' loss path holds the
float32 logits, log_softmax's output and, in backward, the gradient of the logits, each N x V (16384
tokens x 49152 words: 3 GiB apiece). ``linear_cross_entropy`` walks the rows ``chunk`` at a time, so at
most one chunk x V block of logits exists, in the forward pass and in the backward pass.

Two ways to get the gradients without the full logits:

(a) recompute: the forward keeps each row's log-sum-exp; the backward recomputes each chunk's logits
    (a second logits GEMM per chunk) and turns them into the gradient;
(b) fused (Liger Kernel's "fused linear cross-entropy"): the forward, holding a chunk's softmax anyway,
    turns it into that chunk's gradient at once and accumulates grad_hidden (N, H) and grad_weight (V, H);
    the backward only scales them by the incoming gradient.

(b) does three GEMMs per chunk instead of four, for an N x H and a V x H float32 buffer, and is used for
reductions "mean" and "sum" whenever a gradient is wanted. (b) can only pre-compute the gradient of a
loss whose weight per row is known in the forward pass, so reduction "none" (whose backward brings a
weight per row) uses (a). Without any gradient wanted (``torch.no_grad()``, or no input requiring one)
only the loss is computed.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "default_chunk", "CHUNK_BUDGET_BYTES"]

CHUNK_BUDGET_BYTES = 64 * 2**20
"""The default chunk holds this many bytes of float32 logits (chunk x V x 4): big enough that the GEMMs
run at full speed (on a 2-core AVX2 CPU from 128 rows on), small next to the full logits."""

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def default_chunk(n: int, v: int, budget: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk whose float32 logits (rows x v x 4 bytes) fit in `budget`: at least 1, at most n."""
    return max(1, min(n, budget // (4 * max(v, 1))))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, chunk: int | None = None, ignore_index: int = -100,
                         reduction: str = "mean", shift: bool = False,
                         num_items_in_batch: int | torch.Tensor | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T (+ bias)`` against `labels`, a chunk of rows at a time.

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64, any leading dims ((B, S, H), (N, H)); N = their
            product. Read in place when contiguous (a non-contiguous `hidden` is copied by ``reshape``).
        weight: (V, H), the LM head, same dtype and device. It may be tied to the input embedding:
            its gradient comes back through autograd and adds to the embedding's.
        labels: integer tensor of hidden's leading shape, each in [0, V) or `ignore_index`.
        bias: optional (V,), same dtype.
        chunk: rows per chunk (a positive int); default ``default_chunk(N, V)``: 64 MiB of float32 logits.
        ignore_index: rows whose label is this contribute no loss and no gradient.
        reduction: "mean" (over the rows that have a target; 0.0, with zero gradients, when none has),
            "sum", or "none" (per-row losses of hidden's leading shape, 0 at ignored rows).
        shift: transformers' causal-LM shift: position t predicts ``labels[..., t + 1]`` and each row's
            last position has no target. The labels are shifted, not `hidden` (no copy):
            ``labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)``, as ``ForCausalLMLoss`` does.
        num_items_in_batch: with reduction "mean" only: divide the summed loss by this (int or tensor)
            instead of the number of targets, as transformers does under gradient accumulation.
        softcap: final logit softcapping (Gemma 2): the loss reads ``softcap * tanh(logits / softcap)``;
            None or 0 = off. Its gradient goes through the tanh (an extra chunk x V buffer).

    Returns:
        The loss: a scalar, or (...) for reduction "none"; float32 (float64 for float64 inputs).

    Numerics: the log-sum-exp, the softmax, the loss and every sum over chunks are float32 (float64 for
    float64 inputs); gradients come back in each input's dtype. float16/bfloat16 GEMMs run in the input
    dtype on CUDA (tensor cores; the chunk's logits are then rounded to that dtype, as transformers'
    ``(hidden @ weight.T).float()`` rounds them) and in float32 on the CPU, whose half-precision GEMMs
    are 7x to 60x slower than float32 on AVX2 (which costs a float32 copy of weight).

    Memory, beyond the inputs: chunk x V float32 logits; with a gradient wanted and reduction "mean" or
    "sum", N x H and V x H float32 gradient buffers held from forward to backward (strategy (b) of the
    module docstring); for reduction "none" the backward recomputes each chunk's logits (strategy (a)).
    Strategy (b) does its gradient work in the forward pass, used or not: evaluate under ``torch.no_grad()``.
    No logit softcapping, label smoothing or autocast handling (inputs must share one dtype).
    """
    h2, lab, valid, lead, chunk = _prepare(hidden, weight, labels, bias, chunk, ignore_index, reduction, shift,
                                           num_items_in_batch)
    cap = _check_softcap(softcap)
    # The rows with no target read label 0: every chunk then gathers without a branch, and the row's
    # loss and gradient are zeroed through `valid`.
    safe = torch.where(valid, lab, torch.zeros((), dtype=lab.dtype, device=lab.device))
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h2, weight, bias))
    if reduction == "none":
        if wants_grad:
            rows = _RecomputeCE.apply(h2, weight, bias, safe, valid, chunk, cap)
        else:
            rows = _chunked(h2, weight, bias, safe, valid, chunk, cap, want_rows=True)[1]
        return rows.reshape(lead)
    if wants_grad:
        total = _FusedCE.apply(h2, weight, bias, safe, valid, chunk, cap)
    else:
        total = _chunked(h2, weight, bias, safe, valid, chunk, cap)[0]
    # The mean's division happens outside the Function: autograd hands its backward grad_output / denom.
    return total if reduction == "sum" else total / _denominator(valid, num_items_in_batch, total)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                   bias: torch.Tensor | None = None, chunk: int | None = None,
                                   ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                                   num_items_in_batch: int | torch.Tensor | None = None,
                                   softcap: float | None = None) -> torch.Tensor:
    """The oracle of ``linear_cross_entropy`` (same signature and result): the full (N, V) logits, then
    ``torch.nn.functional.cross_entropy``. float16/bfloat16 logits are upcast to float32 first, as
    transformers' ``ForCausalLMLoss`` does; `chunk` is validated and otherwise ignored."""
    h2, lab, valid, lead, _ = _prepare(hidden, weight, labels, bias, chunk, ignore_index, reduction, shift,
                                       num_items_in_batch)
    cap = _check_softcap(softcap)
    # Only the rows with a target enter: an ignored row holds no loss and takes no part in any gradient, even
    # where its hidden state or logits are NaN or inf (a padding position's).
    logits = F.linear(h2[valid], weight, bias)
    if logits.dtype in _HALF_DTYPES:
        logits = logits.float()
    if cap:
        logits = cap * torch.tanh(logits / cap)
    rows = torch.zeros(lab.shape, dtype=logits.dtype, device=logits.device)
    rows = rows.masked_scatter(valid, F.cross_entropy(logits, lab[valid], reduction="none"))
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    return total if reduction == "sum" else total / _denominator(valid, num_items_in_batch, total)


# ----------------------------------------------------------------------------------------- validation

def _prepare(hidden, weight, labels, bias, chunk, ignore_index, reduction, shift, num_items_in_batch):
    """Check the arguments; (hidden as (N, H), labels (N,) int64 after the shift, valid (N,) bool,
    hidden's leading shape, the chunk)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden dtype must be one of float16/bfloat16/float32/float64, got {hidden.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from hidden dtype {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., H) with at least one leading dim, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    v, h = weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden's last dim {hidden.shape[-1]} (shape {tuple(hidden.shape)}) != weight's dim 1 "
                         f"{h} (weight (V, H) = {tuple(weight.shape)})")
    if v == 0:
        raise ValueError(f"weight has no rows (V = 0), shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must be (V,) = ({v},), got shape {tuple(bias.shape)}")
    lead = tuple(hidden.shape[:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels shape {tuple(labels.shape)} != hidden's leading shape {lead} "
                         f"(hidden {tuple(hidden.shape)})")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the mean's denominator: it needs reduction 'mean', "
                         f"got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    n = hidden.numel() // h if h else labels.numel()
    if chunk is None:
        chunk = default_chunk(n, v)
    elif isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral):
        raise TypeError(f"chunk must be a positive int, got {type(chunk).__name__}")
    elif chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk}")
    lab = labels.long()
    if shift and lab.shape[-1]:  # (an empty row stays empty: padding it would make up a target)
        lab = F.pad(lab[..., 1:], (0, 1), value=ignore_index)
    lab = lab.reshape(-1)
    valid = lab != ignore_index
    # One reduction over the labels; the position is looked up only to word the error.
    bad = valid & ((lab < 0) | (lab >= v))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, V = {v}) or ignore_index = {ignore_index}: got {int(lab[i])} "
                         f"at (flattened{', shifted' if shift else ''}) position {i} of {n}")
    return hidden.reshape(n, h), lab, valid, lead, int(chunk)


def _check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap >= 0:
        raise ValueError(f"softcap must be a float >= 0 or None (off), got {softcap!r}")
    return float(softcap)


def _denominator(valid, num_items_in_batch, total):
    """The mean's divisor: num_items_in_batch if given, else the number of targets (1 when there are none:
    the loss is then 0 / 1 = 0 with zero gradients, not 0 / 0)."""
    if num_items_in_batch is None:
        return valid.sum().clamp(min=1).to(total.dtype)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.detach().to(device=total.device, dtype=total.dtype)
    return num_items_in_batch


# ----------------------------------------------------------------------------------------- the chunk loop

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm_dtype(dtype, device):
    """The GEMMs' operand dtype: the input's, except half precision on the CPU (see linear_cross_entropy)."""
    return torch.float32 if dtype in _HALF_DTYPES and device.type == "cpu" else dtype


def _chunk_logits(h_c, weight_t, bias, mm_out, z):
    """The chunk's logits into `z` (accumulation dtype) through `mm_out` (GEMM dtype; `z` itself when the
    two dtypes agree): preallocated buffers, so no chunk allocates (or page-faults in) a fresh block."""
    if h_c.dtype != mm_out.dtype:
        h_c = h_c.to(mm_out.dtype)
    if bias is None:
        torch.mm(h_c, weight_t, out=mm_out)
    else:
        torch.addmm(bias, h_c, weight_t, out=mm_out)
    if z is not mm_out:
        z.copy_(mm_out)
    return h_c


class _Buffers:
    """The per-call work buffers, sized for one chunk of `rows` rows."""

    def __init__(self, h2, weight, bias, rows):
        self.dt = h2.dtype
        self.acc = _acc_dtype(self.dt)
        mm = _mm_dtype(self.dt, h2.device)
        dev = h2.device
        v = weight.shape[0]
        # Half inputs on the CPU: one float32 copy of weight (and bias) serves every chunk's GEMMs.
        self.weight = weight if weight.dtype == mm else weight.to(mm)
        self.bias = bias if bias is None or bias.dtype == mm else bias.to(mm)
        self.mm_out = torch.empty(rows, v, dtype=mm, device=dev)
        self.z = self.mm_out if mm == self.acc else torch.empty(rows, v, dtype=self.acc, device=dev)
        self.tanh = None   # softcap's tanh(logits / cap) per chunk, for the gradient through it

    def softcap(self, z, cap):
        """Cap the chunk's logits in place (z -> cap * tanh(z / cap)); keep the tanh for `uncap_grad`."""
        if self.tanh is None:
            self.tanh = torch.empty_like(self.z)
        t = self.tanh[: z.shape[0]]
        torch.tanh(z.div_(cap), out=t)
        torch.mul(t, cap, out=z)

    def uncap_grad(self, g):
        """The gradient through the cap, in place: d(cap * tanh(z / cap))/dz = 1 - tanh^2."""
        t = self.tanh[: g.shape[0]]
        g.mul_(t.mul_(t).neg_().add_(1))


def _chunked(h2, weight, bias, safe, valid, chunk, cap=0.0, *, grads=(False, False, False), want_rows=False,
             want_lse=False):
    """One pass over the chunks: (summed loss, per-row losses or None, per-row lse or None,
    (grad_hidden, grad_weight, grad_bias) of the summed loss, float32/64, None where not asked)."""
    n, hd = h2.shape
    v = weight.shape[0]
    dev = h2.device
    acc = _acc_dtype(h2.dtype)
    need_h, need_w, need_b = grads
    total = torch.zeros((), dtype=acc, device=dev)
    rows_out = torch.zeros(n, dtype=acc, device=dev) if want_rows else None
    lse_out = torch.empty(n, dtype=acc, device=dev) if want_lse else None
    gh = torch.empty(n, hd, dtype=acc, device=dev) if need_h else None
    gw = torch.zeros(v, hd, dtype=acc, device=dev) if need_w else None
    gb = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    if n == 0:
        return total, rows_out, lse_out, (gh, gw, gb)
    buf = _Buffers(h2, weight, bias, min(chunk, n))
    weight_t = buf.weight.t()
    gw_part = None
    if need_w and buf.mm_out.dtype != acc:  # half GEMM on CUDA: the chunk's partial, then a float32 sum
        gw_part = torch.empty(v, hd, dtype=buf.mm_out.dtype, device=dev)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z, mm_out = buf.z[: e - s], buf.mm_out[: e - s]
        h_c = _chunk_logits(h2[s:e], weight_t, buf.bias, mm_out, z)
        if cap:
            buf.softcap(z, cap)
        lab, ok = safe[s:e, None], valid[s:e]
        target = z.gather(1, lab).squeeze(1)
        m = z.amax(1, keepdim=True)
        z.sub_(m).exp_()  # in place: the chunk's logits become exp(logit - rowmax)
        sums = z.sum(1, keepdim=True)
        lse = (m + sums.log()).squeeze(1)
        loss = torch.where(ok, lse - target, torch.zeros((), dtype=acc, device=dev))
        total += loss.sum()
        if want_rows:
            rows_out[s:e] = loss
        if want_lse:
            lse_out[s:e] = lse
        if need_h or need_w or need_b:
            okf = ok.to(acc)[:, None]
            # d(summed loss)/d logits = softmax - onehot, zero on ignored rows, in place on the buffer.
            z.mul_(okf / sums).scatter_add_(1, lab, -okf)
            if cap:
                buf.uncap_grad(z)
            h_c, ignored = _zero_ignored_rows(z, h_c, ok)
            _backprop_chunk(z, mm_out, h_c, buf.weight, gh[s:e] if need_h else None, gw, gb, gw_part, ignored)
    return total, rows_out, lse_out, (gh, gw, gb)


def _zero_ignored_rows(g, h_c, ok):
    """Rows without a target take no part in any gradient: their rows of the logits' gradient `g` become
    exactly 0 (in place; multiplying by 0 would leave a NaN or inf logit NaN), and the chunk's hidden rows
    that grad_weight reads become 0 in a copy (0 x a NaN hidden state of a padding position is NaN). Returns
    the hidden rows to use and the ignored rows' indices (None when there are none: their grad_hidden rows,
    g @ weight, are 0 x weight, NaN against an inf weight, and are zeroed after by the caller)."""
    if bool(ok.all()):
        return h_c, None
    idx = torch.nonzero(~ok).squeeze(1)
    g.index_fill_(0, idx, 0.0)
    return h_c.index_fill(0, idx, 0.0), idx


def _backprop_chunk(g, mm_buf, h_c, weight, gh_rows, gw, gb, gw_part, ignored=None):
    """Add the chunk's contributions through its logits' gradient `g` (accumulation dtype): write
    gh_rows = g @ weight (0 at the `ignored` rows), add g.T @ h_c to gw and g's column sums to gb."""
    if gb is not None:
        gb.add_(g.sum(0))
    if mm_buf is not g:
        # Half GEMMs (CUDA): the gradient rounded to the input dtype, in the logits' own buffer.
        mm_buf.copy_(g)
        g_mm = mm_buf
    else:
        g_mm = g
    if gh_rows is not None:
        if gh_rows.dtype == g_mm.dtype:
            torch.mm(g_mm, weight, out=gh_rows)
        else:
            gh_rows.copy_(torch.mm(g_mm, weight))
        if ignored is not None:
            gh_rows.index_fill_(0, ignored, 0.0)
    if gw is not None:
        if gw_part is None:
            gw.addmm_(g_mm.t(), h_c)
        else:
            torch.mm(g_mm.t(), h_c, out=gw_part)
            gw.add_(gw_part)


class _FusedCE(torch.autograd.Function):
    """Strategy (b): the summed loss; its gradients computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, h2, weight, bias, safe, valid, chunk, cap):
        need = ctx.needs_input_grad[:3]
        total, _, _, grads = _chunked(h2, weight, bias, safe, valid, chunk, cap, grads=tuple(need))
        ctx.dtypes = (h2.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        # Out of place, so that a second backward (retain_graph=True) finds the buffers unchanged.
        out = tuple(None if g is None else (g * grad_total).to(dt)
                    for g, dt in zip(ctx.saved_tensors, ctx.dtypes))
        return (*out, None, None, None, None)


class _RecomputeCE(torch.autograd.Function):
    """Strategy (a), for reduction "none": per-row losses; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h2, weight, bias, safe, valid, chunk, cap):
        _, rows, lse, _ = _chunked(h2, weight, bias, safe, valid, chunk, cap, want_rows=True, want_lse=True)
        ctx.chunk, ctx.cap = chunk, cap
        ctx.save_for_backward(h2, weight, bias, safe, valid, lse)
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        h2, weight, bias, safe, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, hd = h2.shape
        v = weight.shape[0]
        acc, dev = _acc_dtype(h2.dtype), h2.device
        gh = torch.empty(n, hd, dtype=acc, device=dev) if need_h else None
        gw = torch.zeros(v, hd, dtype=acc, device=dev) if need_w else None
        gb = torch.zeros(v, dtype=acc, device=dev) if need_b else None
        if n:
            chunk = ctx.chunk
            buf = _Buffers(h2, weight, bias, min(chunk, n))
            weight_t = buf.weight.t()
            gw_part = torch.empty(v, hd, dtype=buf.mm_out.dtype, device=dev) \
                if need_w and buf.mm_out.dtype != acc else None
            # Each row's weight in the loss: its incoming gradient, zero where it has no target.
            w_rows = torch.where(valid, grad_rows.to(acc), torch.zeros((), dtype=acc, device=dev))
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                z, mm_out = buf.z[: e - s], buf.mm_out[: e - s]
                h_c = _chunk_logits(h2[s:e], weight_t, buf.bias, mm_out, z)
                if ctx.cap:
                    buf.softcap(z, ctx.cap)
                w = w_rows[s:e, None]
                # softmax from the saved lse, times the row's weight, minus the weighted onehot: in place.
                z.sub_(lse[s:e, None]).exp_().mul_(w).scatter_add_(1, safe[s:e, None], -w)
                if ctx.cap:
                    buf.uncap_grad(z)
                h_c, ignored = _zero_ignored_rows(z, h_c, valid[s:e])
                _backprop_chunk(z, mm_out, h_c, buf.weight, gh[s:e] if need_h else None, gw, gb, gw_part, ignored)
        out = tuple(None if g is None else g.to(t.dtype) for g, t in zip((gh, gw, gb), (h2, weight, bias)))
        return (*out, None, None, None, None)
