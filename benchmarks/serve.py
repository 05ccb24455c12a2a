"""serve-64req: continuous batching (memattn engine) vs transformers generate on padded batches.

64 requests, seeded prompt lengths 16-512 and output lengths 16-256, a random-initialised ~30M-parameter
Llama config (preset "llama-30m"), float32 on CPU. Greedy outputs are checked identical first; then output
tokens/s, mean time to first token are reported (peak memory:
not measured yet). A full run is one timed pass per implementation (the whole workload is minutes on 2 cores).

    python benchmarks/serve.py [--num-requests 64] [--max-output 256] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from memattn.engine import LLM  # noqa: E402
from memattn.engine.models import PRESETS  # noqa: E402
from memattn.engine.workload import make_requests, run_engine, run_hf_generate  # noqa: E402
from memattn.memory.measure import Measurement  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--hf-batch", type=int, default=16, help="padded batch size of hf.generate")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**PRESETS["llama-30m"])
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    n_params = sum(t.numel() for t in hf.parameters())
    import tempfile
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    llm = LLM(folder, kv_cache_memory=512 << 20, max_num_seqs=64, max_num_batched_tokens=2048)
    reqs = make_requests(args.num_requests, seed=0, prompt_lens=(16, args.max_prompt), output_lens=(16, args.max_output))
    case = f"serve-{args.num_requests}req"
    print(f"{case}: {n_params / 1e6:.1f}M params, {sum(len(r[0]) for r in reqs)} prompt tokens, "
          f"{sum(r[1] for r in reqs)} output tokens, {torch.get_num_threads()} threads", flush=True)
    ours = Measurement(run_engine(llm, reqs), 0)  # timed without the profiler (it slows many small ops)
    print(f"memattn.engine: {ours.result['wall_s']:.1f}s", flush=True)
    base = Measurement(run_hf_generate(hf, reqs, args.hf_batch), 0)
    print(f"hf.generate: {base.result['wall_s']:.1f}s", flush=True)
    same = sum(a == b for a, b in zip(ours.result["tokens"], base.result["tokens"]))
    records = []
    for name, m in (("memattn.engine", ours), ("hf.generate", base)):
        r = m.result
        records.append(dict(case=case, impl=name, time_s=r["wall_s"], out_tokens=r["out_tokens"],
                            tokens_per_s=r["out_tokens"] / r["wall_s"], mean_ttft_s=r["mean_ttft_s"],
                            peak_mib=None))
    records[0].update(baseline="hf.generate", baseline_time_s=records[1]["time_s"],
                      speedup=records[0]["tokens_per_s"] / records[1]["tokens_per_s"],
                      identical_outputs=f"{same}/{len(reqs)}", params_m=n_params / 1e6)
    print(f"{'impl':16} {'tok/s':>8} {'TTFT s':>8}")
    for r in records:
        print(f"{r['impl']:16} {r['tokens_per_s']:8.1f} {r['mean_ttft_s']:8.2f}")
    print(f"speedup {records[0]['speedup']:.2f}x; greedy outputs identical: {same}/{len(reqs)}")
    print("hf.generate_batch: not measured (see the engine issue note)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0 if same == len(reqs) else 1


if __name__ == "__main__":
    sys.exit(main())
