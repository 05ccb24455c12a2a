"""training/losses: the chunked LM-head cross-entropy (``linear_cross_entropy``) against the float64 oracle
(``linear_cross_entropy_reference``: full logits, then F.cross_entropy), its reductions, ignore_index,
the causal shift, num_items_in_batch, the no-gradient paths, a tied embedding, its memory, bad inputs.

Pass rule for a path computing in dtype T (DESIGN.md): max|ours - ref64| <= 2 max|naive_T - ref64| + floor,
gradients with factor 3, naive_T the oracle run in T, the floor from conftest.fa_floor (see `floors`).
Inputs are random, seeded per test (conftest's `seed` fixture).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import amax, assert_fa_rule, fa_floor
from memattn.memory import measure
from memattn.training import linear_cross_entropy, losses
from memattn.training.losses import default_chunk, linear_cross_entropy_reference as reference

DTYPES = [torch.bfloat16, torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


def make(seed, lead, h, v, dtype, *, bias=True, ignore=0.2, ignore_index=-100):
    """(hidden, weight, bias) in `dtype` and their float64 copies (the values the low path sees), all leaves
    needing gradients, and labels of shape `lead` with a fraction `ignore` set to ignore_index. Logits are
    of order 1-3 (weight ~ N(0, 2/sqrt(H)))."""
    g = torch.Generator().manual_seed(seed)
    t64 = [torch.randn(*lead, h, generator=g, dtype=torch.float64),
           torch.randn(v, h, generator=g, dtype=torch.float64) * (2 / math.sqrt(h)),
           torch.randn(v, generator=g, dtype=torch.float64) * 0.5]
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore] = ignore_index
    low = [t.to(dtype).requires_grad_() for t in t64]
    high = [t.detach().double().requires_grad_() for t in low]
    if not bias:
        low[2] = high[2] = None
    return low, high, labels


def cotangent(seed, shape, dtype):
    """A seeded cotangent rounded through bfloat16, so that it is exact in every dtype (all paths see one loss)."""
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(shape, generator=g, dtype=torch.float64).bfloat16().to(dtype) + 0.5)


def loss_and_grads(fn, tensors, labels, cot_seed, **kwargs):
    hidden, weight, bias = tensors
    out = fn(hidden, weight, labels, bias=bias, **kwargs)
    cot = cotangent(cot_seed, out.shape, out.dtype)
    leaves = [t for t in tensors if t is not None]
    gs = torch.autograd.grad((out * cot).sum(), leaves)
    gs = list(gs) + [None] * (3 - len(gs))
    return out.detach(), gs, cot


def floors(high, labels, cot, reduction, ignore_index=-100, num_items=None):
    """The rounding floors of the loss and of the three gradients (fa_floor; the dtype is applied by the
    caller). Terms: a logit is H products of <= Mh Mw (+ a bias <= Mb); a row's lse sums V exponentials
    relative to their largest (terms <= 1, the error relative, absolute after the log), plus the logits'
    error; a row's loss is lse - logit_target; the summed loss N rows of <= the largest row loss. A
    gradient of the logits is s (p - onehot), |.| <= s with s the row's weight (the cotangent over the
    mean's count); grad_hidden_i sums V terms of <= s Mw, grad_weight_j N terms of <= s Mh, grad_bias_j N
    terms of <= s. Our lse is computed in another order than the naive one: its error d moves p_ij by
    <= 2 d p_ij, which grad_hidden sees P-weighted (<= 2 d s Mw) and grad_weight / grad_bias summed over
    up to N rows (sqrt(N) for independent roundings)."""
    hidden, weight, bias = high
    v, h = weight.shape
    n = labels.numel()
    count = int((labels != ignore_index).sum())
    denom = float(num_items) if num_items is not None else (max(count, 1) if reduction == "mean" else 1)
    mh, mw, mb = amax(hidden), amax(weight), amax(bias)
    rows = reference(*[t.detach() for t in (hidden, weight)], labels, bias=None if bias is None else bias.detach(),
                     reduction="none", ignore_index=ignore_index)
    s = amax(cot) / (denom if reduction != "none" else 1)

    def at(dtype):
        logit = fa_floor(dtype, mh * mw, h) + fa_floor(dtype, mb, 1)
        lse = fa_floor(dtype, 1.0, v) + logit
        row = lse + logit
        if reduction == "none":
            loss = row
        else:
            loss = (math.sqrt(n) * row + fa_floor(dtype, amax(rows), n)) / denom
        return {"loss": loss,
                "hidden": fa_floor(dtype, s * mw, v) + 2 * lse * s * mw,
                "weight": fa_floor(dtype, s * mh, n) + math.sqrt(n) * 2 * lse * s * mh,
                "bias": fa_floor(dtype, s, n) + math.sqrt(n) * 2 * lse * s}
    return at


def check(name, dtype, low, high, labels, seed, **kwargs):
    """ours(T) and naive(T) against the float64 oracle, loss with factor 2 and gradients with factor 3."""
    ours, g_ours, cot = loss_and_grads(linear_cross_entropy, low, labels, seed, **kwargs)
    ref, g_ref, _ = loss_and_grads(reference, high, labels, seed, **kwargs)
    naive, g_naive = None, [None] * 3
    if dtype != torch.float64:
        naive, g_naive, _ = loss_and_grads(reference, low, labels, seed, **kwargs)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours.shape == ref.shape
    fl = floors(high, labels, cot, kwargs.get("reduction", "mean"), kwargs.get("ignore_index", -100),
                kwargs.get("num_items_in_batch"))(dtype)
    assert torch.isfinite(ours).all()
    assert_fa_rule(f"{name} loss", ours, ref, naive, floor=fl["loss"], factor=2.0, seed=seed)
    for what, go, gr, gn, t in zip(("hidden", "weight", "bias"), g_ours, g_ref, g_naive, low):
        if t is None:
            continue
        assert go.dtype == dtype and go.shape == t.shape
        assert_fa_rule(f"{name} grad_{what}", go, gr, gn, floor=fl[what], factor=3.0, seed=seed)


# ------------------------------------------------------------------------------ against the oracle

SHAPES = {
    "N37-chunk8": ((37,), 40, 211, 8, True),         # N not a multiple of chunk
    "B2xS19-chunk64": ((2, 19), 40, 211, 64, False),  # chunk >= N, 3-d hidden, no bias
    "N50-default": ((50,), 24, 97, None, True),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_float64_reference(shape, dtype, reduction, seed):
    lead, h, v, chunk, bias = SHAPES[shape]
    low, high, labels = make(seed, lead, h, v, dtype, bias=bias)
    check(f"{shape} {dtype} {reduction}", dtype, low, high, labels, seed, chunk=chunk, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])   # the fused and the recompute strategies
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_matches_reference(dtype, reduction, seed):
    """Gemma 2's final logit softcap: the capped logits' loss, its gradient through the tanh (the floors
    of the uncapped logits bound it: the cap's derivative is <= 1)."""
    low, high, labels = make(seed, (37,), 40, 211, dtype)
    high = tuple(None if t is None else (t * 4).detach().requires_grad_() for t in high)  # logits beyond the cap
    low = tuple(None if t is None else (t * 4).detach().requires_grad_() for t in low)
    check(f"softcap {dtype} {reduction}", dtype, low, high, labels, seed, chunk=8, reduction=reduction, softcap=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shift_and_num_items_in_batch_match_reference(dtype, seed):
    low, high, labels = make(seed, (3, 13), 32, 150, dtype)
    check(f"shift {dtype}", dtype, low, high, labels, seed, chunk=7, shift=True)
    check(f"num_items int {dtype}", dtype, low, high, labels, seed, chunk=7, shift=True, num_items_in_batch=29)
    check(f"num_items tensor {dtype}", dtype, low, high, labels, seed, chunk=7,
          num_items_in_batch=torch.tensor(17))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_gemms(dtype, reduction, seed, monkeypatch):
    """The GEMMs in the input dtype (what CUDA runs: the chunk's logits and gradient rounded to it, the
    gradient of weight summed over chunks in float32), forced here on the CPU, whose own default for half
    inputs is float32 GEMMs."""
    monkeypatch.setattr(losses, "_mm_dtype", lambda dt, device: dt)
    low, high, labels = make(seed, (37,), 40, 211, dtype)
    check(f"half GEMMs {dtype} {reduction}", dtype, low, high, labels, seed, chunk=8, reduction=reduction)


def test_ignore_index_other_than_default(seed):
    low, high, labels = make(seed, (30,), 16, 64, torch.float32, ignore=0.3, ignore_index=5)
    labels[labels == 5] = 6  # only the rows set to ignore carry 5
    labels[:4] = 5
    check("ignore_index=5", torch.float32, low, high, labels, seed, chunk=8, ignore_index=5)


def test_shift_equals_manually_shifted_labels_and_transformers(seed):
    """shift=True is exactly shift=False on F.pad(labels[..., 1:]) (each row's last position ignored), and
    agrees with transformers' ForCausalLMLoss on the full logits."""
    low, high, labels = make(seed, (2, 11), 16, 50, torch.float32, bias=False)
    manual = F.pad(labels[..., 1:], (0, 1), value=-100)
    a, ga, _ = loss_and_grads(linear_cross_entropy, low, labels, seed, chunk=4, shift=True)
    b, gb, _ = loss_and_grads(linear_cross_entropy, low, manual, seed, chunk=4)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga[:2], gb[:2]))
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    hidden, weight = (t.detach() for t in high[:2])
    logits = hidden @ weight.T
    # transformers computes in float32 whatever the input (logits.float()): its rounding of the logits moves
    # a row's loss (lse - target logit) by <= 2 u max|logit|, its softmax sums and its mean add their floors.
    rows = reference(hidden, weight, labels, shift=True, reduction="none")
    bound = (2 * torch.finfo(torch.float32).eps / 2 * amax(logits) + fa_floor(torch.float32, 1.0, logits.shape[1])
             + fa_floor(torch.float32, amax(rows), rows.numel()))
    for kw in ({}, {"num_items_in_batch": 7}):
        hf = loss_utils.ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0], **kw)
        ours = linear_cross_entropy(hidden, weight, labels, shift=True, chunk=5, **kw)
        assert (ours - hf).abs().item() <= bound, kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_give_zero_loss_and_zero_grads(reduction, seed):
    low, _, labels = make(seed, (9,), 8, 20, torch.float32, ignore=1.0)
    assert (labels == -100).all()
    out = linear_cross_entropy(*low[:2], labels, bias=low[2], chunk=4, reduction=reduction)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for t in low:
        assert torch.equal(t.grad, torch.zeros_like(t))
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(*low[:2], labels, reduction=reduction), torch.zeros_like(out))


def test_empty_rows(seed):
    low, _, _ = make(seed, (0,), 8, 20, torch.float32)
    labels = torch.zeros(0, dtype=torch.long)
    out = linear_cross_entropy(*low[:2], labels, bias=low[2])
    out.backward()
    assert out.item() == 0.0 and low[1].grad.abs().max() == 0
    assert linear_cross_entropy(*low[:2], labels, reduction="none").shape == (0,)


# ------------------------------------------------------------------------------ which gradients are computed

def test_no_grad_paths_compute_only_the_loss(seed, monkeypatch):
    """No gradient wanted (torch.no_grad, or no input requiring one): the same loss, no graph, no gradient
    work; a frozen head (weight.requires_grad False): only hidden's (and bias's) gradient is computed."""
    low, _, labels = make(seed, (21,), 16, 40, torch.float32)
    hidden, weight, bias = low
    want = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk=6).detach()
    asked = []
    real = losses._chunked

    def spy(*args, **kwargs):
        asked.append(kwargs.get("grads", (False, False, False)))
        return real(*args, **kwargs)
    monkeypatch.setattr(losses, "_chunked", spy)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk=6)
    assert got.grad_fn is None and torch.equal(got, want)
    got = linear_cross_entropy(hidden.detach(), weight.detach(), labels, bias=bias.detach(), chunk=6)
    assert got.grad_fn is None and torch.equal(got, want)
    assert asked == [(False, False, False)] * 2

    frozen = weight.detach()
    got = linear_cross_entropy(hidden, frozen, labels, bias=bias, chunk=6)
    assert asked[-1] == (True, False, True)
    got.backward()
    g_ref = torch.autograd.grad(reference(hidden, frozen, labels, bias=bias), [hidden, bias])
    for t, g in zip((hidden, bias), g_ref):
        assert torch.allclose(t.grad, g, rtol=1e-5, atol=1e-7)
    assert frozen.grad is None


def test_backward_twice_with_retain_graph(seed):
    """The backward scales the forward's gradient buffers out of place: a second backward sees them intact."""
    low, _, labels = make(seed, (17,), 16, 30, torch.float32)
    loss = linear_cross_entropy(*low[:2], labels, bias=low[2], chunk=5)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in low]
    (loss * 3).backward()
    for t, g in zip(low, first):
        assert torch.allclose(t.grad, 4 * g, rtol=1e-6, atol=1e-7)


def test_tied_embedding_accumulates_both_paths(seed):
    """An nn.Embedding whose weight is also the head: its gradient is the lookup's plus the head's."""
    torch.manual_seed(seed)
    v, h = 31, 12
    emb = torch.nn.Embedding(v, h).double()
    ids = torch.randint(0, v, (2, 9))
    mix = torch.randn(h, h, dtype=torch.float64)

    def run(fn):
        emb.weight.grad = None
        hidden = torch.tanh(emb(ids) @ mix)  # the model between the embedding and the head
        fn(hidden, emb.weight, ids, shift=True, chunk=4).backward()
        return emb.weight.grad.clone()

    got, want = run(linear_cross_entropy), run(reference)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert (got[ids.flatten()] != 0).any()


# ------------------------------------------------------------------------------ memory

def test_memory_stays_far_below_the_logits():
    """Forward + backward at N=2048, V=8192, float32, chunk=128: the peak stays under a quarter of one N x V
    float32 logits tensor (ours: chunk x V logits, N x H and V x H gradient buffers), while the reference
    holds more than one."""
    n, v, h = 2048, 8192, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / 8).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    logits_bytes = n * v * 4

    def step(fn, **kw):
        def call():
            hidden.grad = weight.grad = None
            fn(hidden, weight, labels, **kw).backward()
        return call

    ours = measure(step(linear_cross_entropy, chunk=128))
    ref = measure(step(reference))
    assert ours < logits_bytes / 4, f"ours peaked at {ours / 2**20:.1f} MiB"
    assert ref > logits_bytes, f"the reference peaked at {ref / 2**20:.1f} MiB"


def test_default_chunk_bounds_the_logits():
    assert default_chunk(100000, 49152) == 64 * 2**20 // (4 * 49152)
    assert default_chunk(10, 49152) == 10
    assert default_chunk(5, 10**9) == 1


# ------------------------------------------------------------------------------ bad inputs

def _bad(kind):
    """(args, kwargs, the exception, a regex of its message) of one bad call."""
    h = torch.randn(2, 5, 8)
    w = torch.randn(30, 8)
    y = torch.randint(0, 30, (2, 5))
    return {
        "hidden dim": ((torch.randn(2, 5, 7), w, y), {}, ValueError, "hidden's last dim 7"),
        "weight dim 1": ((h, torch.randn(30, 9), y), {}, ValueError, "weight's dim 1 9"),
        "weight 3-d": ((h, torch.randn(30, 8, 1), y), {}, ValueError,
                       r"weight must be \(V, H\), got shape \(30, 8, 1\)"),
        "labels shape": ((h, w, y[:, :4]), {}, ValueError,
                         r"labels shape \(2, 4\) != hidden's leading shape \(2, 5\)"),
        "labels float": ((h, w, y.float()), {}, TypeError, "integer tensor, got dtype torch.float32"),
        "labels range": ((h, w, y.index_fill(1, torch.tensor([3]), 30)), {}, ValueError, r"\[0, V = 30\).*got 30"),
        "labels negative": ((h, w, y.index_fill(1, torch.tensor([0]), -1)), {}, ValueError, "got -1 at"),
        "reduction": ((h, w, y), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        "bias shape": ((h, w, y), {"bias": torch.zeros(29)}, ValueError,
                       r"bias must be \(V,\) = \(30,\), got shape \(29,\)"),
        "chunk zero": ((h, w, y), {"chunk": 0}, ValueError, "chunk must be a positive int, got 0"),
        "chunk float": ((h, w, y), {"chunk": 2.5}, TypeError, "chunk must be a positive int"),
        "dtype mix": ((h, w.double(), y), {}, TypeError, "weight dtype torch.float64 differs"),
        "hidden int": ((h.long(), w, y), {}, TypeError, "hidden dtype"),
        "num_items sum": ((h, w, y), {"reduction": "sum", "num_items_in_batch": 3}, ValueError,
                          "needs reduction 'mean'"),
        "hidden 1-d": ((torch.randn(8), w, torch.tensor(1)), {}, ValueError, "at least one leading dim"),
    }[kind]


BAD_KINDS = ["hidden dim", "weight dim 1", "weight 3-d", "labels shape", "labels float", "labels range",
             "labels negative", "reduction", "bias shape", "chunk zero", "chunk float", "dtype mix", "hidden int",
             "num_items sum", "hidden 1-d"]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("fn", [linear_cross_entropy, reference], ids=["ours", "reference"])
def test_bad_inputs_name_the_sizes(fn, kind):
    args, kwargs, exc, words = _bad(kind)
    with pytest.raises(exc, match=words):
        fn(*args, **kwargs)


def test_shifted_label_out_of_range_is_found_after_the_shift():
    """With shift=True the first label of each row is never read (transformers drops it too): only the read
    labels are checked."""
    h, w = torch.randn(1, 4, 8), torch.randn(30, 8)
    y = torch.tensor([[99, 1, 2, 3]])
    linear_cross_entropy(h, w, y, shift=True)
    with pytest.raises(ValueError, match="got 99 at"):
        linear_cross_entropy(h, w, y.roll(1, 1), shift=True)
