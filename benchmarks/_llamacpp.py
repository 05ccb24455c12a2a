"""llama.cpp as a baseline (benchmark-only code): equal-precision GGUF files and its single-stream speed.

llama-cpp-python is built from source by ``make bench-real`` (``$(VENV)/.llamacpp``), which also keeps its
sdist in ``<venv>/sdist``: the sdist carries llama.cpp's ``convert_hf_to_gguf.py`` and its ``gguf-py``, which turn
a Hugging Face folder into F32 and BF16 GGUF files of the same weights (cached beside the folder's cache).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import time

from memattn.testing import cache_dir


def sdist_dir() -> str:
    """The unpacked llama-cpp-python sdist's llama.cpp tree (unpacked once into the cache)."""
    found = sorted(glob.glob(os.path.join(sys.prefix, "sdist", "llama_cpp_python-*.tar.gz")))
    if not found:
        raise FileNotFoundError(f"no llama-cpp-python sdist in {sys.prefix}/sdist: run `make bench-real`")
    out = os.path.join(cache_dir(), "llama-cpp-python-src")
    root = os.path.join(out, os.path.basename(found[-1])[:-len(".tar.gz")], "vendor", "llama.cpp")
    if not os.path.exists(os.path.join(root, "convert_hf_to_gguf.py")):
        with tarfile.open(found[-1]) as tar:
            tar.extractall(out, filter="data")
    return root


def convert(folder: str, outtype: str) -> str:
    """A GGUF file (outtype "f32" or "bf16") of the Hugging Face folder's weights, made once and cached."""
    out = os.path.join(cache_dir(), "gguf", f"{os.path.basename(os.path.normpath(folder))}-{outtype}.gguf")
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    root = sdist_dir()
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "gguf-py"))
    subprocess.run([sys.executable, os.path.join(root, "convert_hf_to_gguf.py"), folder, "--outtype", outtype,
                    "--outfile", out + ".part"], check=True, env=env, stdout=subprocess.DEVNULL)
    os.replace(out + ".part", out)
    return out


def load(gguf_path: str, *, threads: int, n_ctx: int = 2048):
    from llama_cpp import Llama

    return Llama(model_path=gguf_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                 seed=0)


def single_stream(llm, prompt_ids: list, max_tokens: int) -> tuple[float, list]:
    """(wall seconds, generated ids) of one greedy call from a fresh context: prefill of prompt_ids, then
    max_tokens tokens, EOS ignored (``generate`` itself never stops; the caller cuts at max_tokens)."""
    llm.reset()
    out = []
    t0 = time.perf_counter()
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        out.append(int(tok))
        if len(out) == max_tokens:
            break
    return time.perf_counter() - t0, out


__all__ = ["sdist_dir", "convert", "load", "single_stream"]
