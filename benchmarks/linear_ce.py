"""LM-head cross-entropy on CPU: memattn.training.linear_cross_entropy against transformers' loss path.

    python benchmarks/linear_ce.py [--cases NAME,...] [--repeats N] [--threads N] [--json PATH] [--chunk ROWS]

Case (float32, SmolLM2-135M's head: H=576, V=49152):
- linear-ce-S16384: hidden (1, 16384, 576), weight (49152, 576), random labels; forward + backward
  (``loss.backward()``, grads of hidden and weight) of ``linear_cross_entropy(hidden, weight, labels,
  shift=True)`` against transformers' own path (baseline ``hf.loss``): ``logits = hidden @ weight.T``, then
  ``transformers.loss.loss_utils.ForCausalLMLoss(logits, labels, V)`` (the same shift, the mean over targets).

Fields: ``max_err`` the two losses' difference, ``grad_err`` the largest difference of the two hidden / weight
gradients relative to that gradient's largest entry; ``peak_mib`` / ``baseline_peak_mib`` one measured call
each (``memattn.memory.measure``: the peak of the torch allocator's running sum during the call, inputs
excluded), separate from the timed calls, ``mem_ratio`` = baseline peak / ours; ``speedup`` = baseline time /
ours (medians of ``--repeats``, default 5, interleaved; the measured calls are the warm-up); ``chunk`` the
rows per chunk (``--chunk``; default: ``default_chunk``, 64 MiB of float32 logits).
Targets (the issue): mem_ratio >= 8, speedup >= 0.87.

``run_linear_ce(args)`` returns the records, for scripts that gather several benchmarks.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402

from memattn.memory import measure  # noqa: E402
from memattn.training.losses import default_chunk, linear_cross_entropy  # noqa: E402

MIB = 2 ** 20
CASES = {"linear-ce-S16384": (16384, 576, 49152)}  # name: (S, H, V)


def inputs(s, h, v, seed=0):
    """hidden (1, S, H) and weight (V, H) as leaves needing gradients, labels (1, S) int64: logits of about unit
    scale (weight ~ N(0, 1/H)), as a trained head gives."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, s, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).requires_grad_()
    labels = torch.randint(0, v, (1, s), generator=g)
    return hidden, weight, labels


def hf_loss(hidden, weight, labels):
    """transformers' causal-LM loss path: full logits, then ForCausalLMLoss (float32 upcast, shift, mean)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = hidden @ weight.T
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0])


def fwd_bwd(loss_fn, hidden, weight, labels, out):
    """A call running loss_fn forward and backward on fresh .grad, leaving the loss in out["loss"]."""
    def call():
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        out["loss"] = loss.detach()
    return call


def case(name, s, h, v, repeats, chunk=None):
    hidden, weight, labels = inputs(s, h, v)
    chunk = default_chunk(s, v) if chunk is None else chunk
    ours_out, base_out = {}, {}
    ours = fwd_bwd(lambda x, w, y: linear_cross_entropy(x, w, y, shift=True, chunk=chunk), hidden, weight, labels,
                   ours_out)
    base = fwd_bwd(hf_loss, hidden, weight, labels, base_out)
    # One measured call each (also the warm-up), keeping each side's gradients for the check.
    peak = measure(ours)
    grads = (hidden.grad, weight.grad)
    base_peak = measure(base)
    err = (ours_out["loss"] - base_out["loss"]).abs().item()
    grad_err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, (hidden.grad, weight.grad)))
    del grads
    times = _harness.interleaved_times({"ours": ours, "base": base}, repeats, warmup=0)
    rec = _harness.record(name, f"memattn.training.linear_cross_entropy(shift, chunk={chunk})", "hf.loss",
                          times["ours"], times["base"], peak_mib=peak / MIB, baseline_peak_mib=base_peak / MIB,
                          mem_ratio=base_peak / peak, max_err=err, grad_err=grad_err, loss=ours_out["loss"].item(),
                          chunk=chunk, threads=torch.get_num_threads(), repeats=repeats,
                          logits_mib=s * v * 4 / MIB)
    return rec


def run_linear_ce(args) -> list:
    """The selected cases' records; `args` needs ``cases`` and ``repeats`` (and optionally ``chunk``)."""
    chunk = getattr(args, "chunk", None)
    return [case(name, *CASES[name], args.repeats, chunk) for name in _harness.selected(CASES, args.cases)]


def main(argv=None):
    ap = _harness.parser(__doc__, repeats=5)
    ap.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: default_chunk)")
    args = ap.parse_args(argv)
    recs = run_linear_ce(args)
    _harness.print_records(recs, extra_cols=("mem_ratio", "grad_err", "chunk", "threads"))
    _harness.write_json(args.json, recs)
    return recs


if __name__ == "__main__":
    main()
