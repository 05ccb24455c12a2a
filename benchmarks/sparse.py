"""Structured sparsity: memattn's blockwise schedule against SDPA with a dense mask and compiled FlexAttention.

Cases (B=1, H=8, D=64, fp32):
- window512-causal-{fwd|fwdbwd}-S{4096|16384|65536}: causal sliding window of 512 keys;
  baselines torch.sdpa+densemask (where the mask fits) and torch.flex (forward only: no CPU backward;
  its compile time is recorded in `compile_s`, not in time_s);
- bigbird-fwd-S16384: bigbird(64, 3, 1, 2) against the same two baselines;
- varlen16docs-{fwd|fwdbwd}-S16384: 16 documents of seeded random lengths summing to 16384, packed,
  against torch.sdpa on the zero-padded batch (B=16, S=max length, key padding mask).
Throughput: `useful_gflops` counts 4*D FLOP per visible (query, key) pair (x3.5 with backward).
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import _harness  # noqa: E402

import memattn  # noqa: E402
from memattn import masks  # noqa: E402
from memattn.compare import rows_error  # noqa: E402
from memattn.memory import available_bytes, measure  # noqa: E402

H, D, WINDOW = 8, 64, 512


def _inputs(s, backward, seed, b=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, H, D, generator=g).requires_grad_(backward) for _ in range(3)]


def _bhsd(x):
    return x.transpose(1, 2)


def _step(fn, args, backward, dout=None):
    def run():
        out = fn(*args)
        if backward:
            out.backward(dout)
            for a in args:
                a.grad = None
    return run


def _flex(mask_mod, s):
    """Compiled flex_attention on (B, S, H, D) inputs; returns (fn, compile_s) or (None, reason)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        block_mask = create_block_mask(mask_mod, 1, 1, s, s, device="cpu")
        compiled = torch.compile(flex_attention)

        def fn(q, k, v):
            return compiled(_bhsd(q), _bhsd(k), _bhsd(v), block_mask=block_mask).transpose(1, 2)
        g = torch.Generator().manual_seed(1)
        q = torch.randn(1, s, H, D, generator=g)
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(q, q, q)
        return fn, time.perf_counter() - t0
    except Exception as e:  # no compiler, unsupported build: the record says why
        return None, f"{type(e).__name__}: {str(e)[:120]}"


def _dense_sdpa(mask_obj, s):
    dense = mask_obj.dense(s, s)[0, 0]
    return lambda q, k, v: F.scaled_dot_product_attention(_bhsd(q), _bhsd(k), _bhsd(v), attn_mask=dense).transpose(1, 2)


def masked_case(case, mask_obj, mask_mod, ours, s, backward, repeats, useful_pairs):
    q, k, v = _inputs(s, backward, s)
    dout = torch.randn_like(q) if backward else None
    baselines = {}
    if s * s * 5 < 0.5 * available_bytes():  # bool mask + SDPA's float copy of it
        baselines["torch.sdpa+densemask"] = _dense_sdpa(mask_obj, s)
    compile_s = None
    if not backward:
        flex, info = _flex(mask_mod, s)
        if flex is not None:
            baselines["torch.flex"] = flex
            compile_s = info
        else:
            print(f"  torch.flex unavailable: {info}")
    with torch.no_grad():
        err = rows_error(ours(q, k, v), q, k, v, mask_obj)
        errs = {n: rows_error(f(q, k, v), q, k, v, mask_obj) for n, f in baselines.items()}
    flops = 4 * H * D * useful_pairs * (3.5 if backward else 1.0)
    recs = []
    for name, base in baselines.items():
        works = {"ours": _step(ours, (q, k, v), backward, dout), "base": _step(base, (q, k, v), backward, dout)}
        reps = repeats if name != "torch.sdpa+densemask" or s <= 4096 else max(2, repeats // 2)
        first_ours = time.perf_counter()
        works["ours"]()
        first_ours = time.perf_counter() - first_ours
        times = _harness.interleaved_times(works, reps)
        peaks = {n: measure(w) / 2**20 for n, w in works.items()}
        recs.append(_harness.record(
            case, "memattn.blockwise", name, times["ours"], times["base"], peak_mib=peaks["ours"],
            baseline_peak_mib=peaks["base"], max_err=err, baseline_max_err=errs[name], reps=reps,
            compile_s=compile_s if name == "torch.flex" else None, first_call_s=first_ours,
            useful_gflops=flops / times["ours"] / 1e9, dense_mask_mib=s * s / 2**20))
    if not baselines:  # nothing to compare against at this size: still report ours
        work = _step(ours, (q, k, v), backward, dout)
        t = _harness.interleaved_times({"ours": work}, max(1, repeats // 2))["ours"]
        recs.append(_harness.record(case, "memattn.blockwise", None, t, None, peak_mib=measure(work) / 2**20,
                                    max_err=err, useful_gflops=flops / t / 1e9, dense_mask_mib=s * s / 2**20,
                                    peak_over_dense_mask=None))
        recs[-1]["peak_over_dense_mask"] = recs[-1]["peak_mib"] / recs[-1]["dense_mask_mib"]
    return recs


def window_pairs(s):
    return sum(min(i + 1, WINDOW) for i in range(s))


def varlen_case(backward, repeats):
    s, ndocs = 16384, 16
    g = torch.Generator().manual_seed(16)
    cuts = torch.sort(torch.randperm(s - 1, generator=g)[:ndocs - 1] + 1).values.tolist()
    lens = [b - a for a, b in zip([0] + cuts, cuts + [s])]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    q, k, v = (x[0] for x in _inputs(s, False, 7))
    q, k, v = (x.detach().requires_grad_(backward) for x in (q, k, v))
    maxlen = max(lens)
    # padded batch for SDPA: (16, maxlen, H, D) and a key padding mask
    pad = torch.zeros(ndocs, maxlen, dtype=torch.bool)
    for i, n in enumerate(lens):
        pad[i, :n] = True
    index = torch.cat([torch.arange(n) + i * maxlen for i, n in enumerate(lens)])

    def padded(x):
        out = x.new_zeros(ndocs * maxlen, H, D)
        return out.index_copy(0, index, x).view(ndocs, maxlen, H, D)

    attn_mask = pad[:, None, None, :]

    def sdpa_padded(q, k, v):
        o = F.scaled_dot_product_attention(_bhsd(padded(q)), _bhsd(padded(k)), _bhsd(padded(v)), attn_mask=attn_mask)
        return o.transpose(1, 2).reshape(ndocs * maxlen, H, D).index_select(0, index)

    def ours(q, k, v):
        return memattn.attention_varlen(q, k, v, cu, cu, maxlen, maxlen)

    with torch.no_grad():
        o1, o2 = ours(q, k, v), sdpa_padded(q, k, v)
        # exactness per document against the float64 reference on the first document's rows
        d0 = slice(0, lens[0])
        err = rows_error(o1[d0][None], q[d0][None], k[d0][None], v[d0][None])
        diff = (o1 - o2).abs().max().item()
    dout = torch.randn_like(q) if backward else None
    works = {"ours": _step(ours, (q, k, v), backward, dout), "base": _step(sdpa_padded, (q, k, v), backward, dout)}
    times = _harness.interleaved_times(works, repeats)
    peaks = {n: measure(w) / 2**20 for n, w in works.items()}
    useful = sum(n * n for n in lens)
    case = f"varlen16docs-{'fwdbwd' if backward else 'fwd'}-S{s}-fp32"
    return [_harness.record(case, "memattn.attention_varlen", "torch.sdpa(padded)", times["ours"], times["base"],
                            peak_mib=peaks["ours"], baseline_peak_mib=peaks["base"], max_err=err,
                            max_diff_vs_baseline=diff, doc_lens=lens, reps=repeats,
                            useful_gflops=4 * H * D * useful * (3.5 if backward else 1) / times["ours"] / 1e9)]


def main():
    p = _harness.parser(__doc__)
    p.add_argument("--seq-lens", default="4096,16384,65536")
    args = p.parse_args()
    recs = []
    win = masks.sliding_window(WINDOW - 1, 0)

    def win_mod(b, h, i, j):
        return (j <= i) & (i - j < WINDOW)

    def ours_win(q, k, v):
        return memattn.attention(q, k, v, causal=True, window_size=(WINDOW - 1, 0))

    for s in [int(x) for x in args.seq_lens.split(",")]:
        for backward in (False, True):
            case = f"window512-causal-{'fwdbwd' if backward else 'fwd'}-S{s}-fp32"
            if not _harness.wants(case, args.cases):
                continue
            recs += masked_case(case, win, win_mod, ours_win, s, backward, args.repeats, window_pairs(s))
            _harness.print_records(recs[-2:], ("useful_gflops", "compile_s"))
    if _harness.wants("bigbird-fwd-S16384-fp32", args.cases):
        s = 16384
        bb = masks.bigbird(64, 3, 1, 2, seed=0)
        lay = bb.layout(s, s)

        def bb_mod(b, h, i, j):
            return lay[i // 64, j // 64]

        def ours_bb(q, k, v):
            return memattn.attention(q, k, v, mask=bb)
        recs += masked_case("bigbird-fwd-S16384-fp32", bb, bb_mod, ours_bb, s, False, args.repeats,
                            int(lay.sum()) * 64 * 64)
        _harness.print_records(recs[-2:], ("useful_gflops", "compile_s"))
    for backward in (False, True):
        case = f"varlen16docs-{'fwdbwd' if backward else 'fwd'}-S16384-fp32"
        if not _harness.wants(case, args.cases):
            continue
        recs += varlen_case(backward, args.repeats)
        _harness.print_records(recs[-1:], ("useful_gflops",))
    print()
    _harness.print_records(recs, ("useful_gflops", "compile_s"))
    _harness.write_json(args.json, recs)


if __name__ == "__main__":
    main()
