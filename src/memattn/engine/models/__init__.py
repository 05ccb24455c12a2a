"""Our forward passes (Llama family, GPT-2) over the paged KV pool, and the loader."""
from .common import StepBatch
from .gpt2 import GPT2LMHeadModel
from .llama import LlamaForCausalLM
from .loader import PRESETS, build_model, config_from_hf, load_folder, load_model

__all__ = ["StepBatch", "LlamaForCausalLM", "GPT2LMHeadModel", "PRESETS", "build_model", "config_from_hf",
           "load_folder", "load_model"]
