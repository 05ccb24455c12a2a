"""The serve workload (``benchmarks/serve.py``, ``memattn bench-serve``): seeded requests run through the engine,
throughput, TTFT and peak memory measured. The transformers baselines it is compared against live in
``benchmarks/_hf_baselines.py`` (benchmark-only code)."""
from __future__ import annotations

import time

import torch

from .config import SamplingParams
from .llm import LLM


def make_requests(num: int, seed: int = 0, prompt_lens=(16, 512), output_lens=(16, 256), vocab: int = 8000):
    """[(prompt token ids, output length)] with lengths drawn uniformly from the ranges."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(num):
        n = int(torch.randint(prompt_lens[0], prompt_lens[1] + 1, (1,), generator=g))
        m = int(torch.randint(output_lens[0], output_lens[1] + 1, (1,), generator=g))
        reqs.append((torch.randint(3, vocab, (n,), generator=g).tolist(), m))
    return reqs


def run_engine(llm: LLM, reqs, progress=None) -> dict:
    """Greedy, EOS ignored, each request to its own output length. Returns wall_s, tokens (list per request),
    out_tokens, mean_ttft_s (from the request's arrival, all requests arrive at the start)."""
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params, progress=progress)
    wall = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    ttft = sum(o.outputs[0].time_to_first_token for o in outs) / len(outs)
    return dict(wall_s=wall, tokens=tokens, out_tokens=sum(map(len, tokens)), mean_ttft_s=ttft)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class ProcessPeak:
    """Peak resident memory of this process while the ``with`` block runs, above its resident size at entry.

    Linux only: the kernel's high-water mark (VmHWM) is reset at entry (``/proc/self/clear_refs`` 5) and read
    at exit. It sees everything the process touches (PyTorch tensors, BLAS workspace, Python objects, other
    threads), page granular, but only pages actually touched: a reserved, never written pool is not counted.
    Measure in a fresh process: memory freed earlier but kept by the allocator hides part of a later peak.
    ``peak_mib`` is None where the counters are unavailable.
    """

    def __enter__(self):
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            pass
        self.start_kib = _status_kib("VmRSS")
        self.peak_mib = None
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM")
        if self.reset and hwm is not None and self.start_kib is not None:
            self.peak_mib = (hwm - self.start_kib) / 1024
        return False


__all__ = ["make_requests", "run_engine", "ProcessPeak"]
