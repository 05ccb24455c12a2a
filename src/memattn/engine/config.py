"""Validated configuration objects of the engine: the model's shape, the engine's budgets, a request's sampling."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..cache.kv_formats import FORMATS as KV_FORMATS

ARCHS = ("llama", "gpt2")
PREEMPTION = ("recompute", "swap")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _check_int(name, value, low=1, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model, in Hugging Face's vocabulary.

    arch: "llama" (Llama 2/3, Mistral, Qwen2: RMSNorm, RoPE, gated MLP) or "gpt2" (LayerNorm, learned
    positions, GELU MLP). window: sliding-window length W per layer (a key is visible to a query at most
    W - 1 positions behind it, as transformers' ``sliding_window``), None for full attention.
    rope_scaling: None or a dict with ``rope_type`` in {"default", "linear", "llama3"}.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    head_dim: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    windows: tuple = ()  # per layer: None or W; empty = no window anywhere
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    model_type: str = ""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            _check_int(name, getattr(self, name))
        _check_int("head_dim", self.head_dim, allow_none=True)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.windows and len(self.windows) != self.num_layers:
            raise ValueError(f"windows has {len(self.windows)} entries for {self.num_layers} layers")
        for w in self.windows:
            _check_int("sliding window", w, allow_none=True)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
        if self.arch == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ValueError("gpt2 has as many kv heads as query heads")

    def window(self, layer: int):
        return self.windows[layer] if self.windows else None


def _option(default, help: str, **cli):
    """An ``EngineConfig`` field; `help` (one line) and `cli` (unit="bytes", flag="--name") tell
    ``memattn.engine.args`` how to offer it on the command line."""
    return field(default=default, metadata=dict(help=help, **cli))


def _dtype(value) -> torch.dtype:
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if not isinstance(value, (str, torch.dtype)):
        raise TypeError(f"dtype must be a torch dtype or its name, got {type(value).__name__}")
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")


def _device(value) -> torch.device:
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"device must be a string or a torch.device, got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError:
        raise ValueError(f"device {value!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None


@dataclass(frozen=True)
class EngineConfig:
    """Every option of the engine, validated (``LLM(model, config)``).

    block_size: tokens per KV block. kv_cache_memory: bytes of the KV pool, or num_kv_blocks to give its
    size in blocks instead (it wins when set). max_num_seqs: running sequences at most (a request with n
    completions counts n). max_num_batched_tokens: tokens per step (prefill chunks and decodes together).
    max_model_len: prompt + output tokens at most; None: the model's max_position_embeddings.
    enable_prefix_caching: reuse the KV of full blocks an earlier prompt computed. preemption: "recompute"
    (free and re-prefill) or "swap" (copy blocks to a host tier of swap_space bytes).
    dtype: of the weights and the KV pool, a torch dtype or its name (float32, bfloat16, float16, float64);
    after validation always a torch dtype. A model object given to ``LLM`` keeps its own dtype.
    kv_cache_dtype: how the KV pool stores keys and values (``memattn.cache.kv_formats``): "auto" (the
    model's dtype), "int8" / "fp8_e4m3" (a float32 scale per token and kv head), "int4" / "int2" (KIVI).
    device: of the model and the pool ("cpu", "cuda:0", ...), a torch.device after validation.
    seed: of the random weights of a preset, HF config dict or ModelConfig (a checkpoint ignores it).
    attention_sinks, streaming_window: StreamingLLM (``engine.streaming``): with a window W, every query
    attends to the first attention_sinks tokens and the last W; a sequence keeps only their blocks (the
    rest freed as it goes) and is not bound by max_model_len. None: off. Rotary (llama) models without a
    sliding window of their own; no prefix caching (turned off) and no swap preemption (refused).

    Each field's ``metadata["help"]`` is its command-line help (``memattn.engine.args.add_engine_args``).
    """

    block_size: int = _option(16, "tokens per KV block")
    kv_cache_memory: int = _option(256 << 20, "size of the KV pool", unit="bytes")
    num_kv_blocks: int | None = _option(None, "size of the KV pool in blocks (instead of --kv-cache-memory)")
    max_num_seqs: int = _option(64, "running sequences at most (a request with n completions counts n)")
    max_num_batched_tokens: int = _option(2048, "token budget per step (prefill chunks and decodes together)")
    max_model_len: int | None = _option(None, "prompt + output tokens at most (default: the model's limit)")
    enable_prefix_caching: bool = _option(True, "reuse the KV of full blocks earlier prompts computed")
    preemption: str = _option("recompute", "when the pool is full: free and re-prefill, or swap to host memory",
                              choices=PREEMPTION)
    swap_space: int = _option(256 << 20, "host tier for --preemption swap", unit="bytes")
    dtype: torch.dtype = _option(torch.float32, "dtype of the weights and the KV pool", choices=tuple(DTYPES))
    kv_cache_dtype: str = _option("auto", "KV pool storage: the model's dtype, or quantized with scales",
                                  choices=tuple(KV_FORMATS))
    device: torch.device = _option(torch.device("cpu"), "device of the model and the KV pool")
    seed: int = _option(0, "seed of random weights (presets, configs; a checkpoint ignores it)",
                        flag="--model-seed")
    attention_sinks: int = _option(0, "StreamingLLM: leading tokens every query keeps attending to "
                                      "(with --streaming-window)")
    streaming_window: int | None = _option(None, "StreamingLLM: recent tokens each query attends to; a sequence "
                                                 "keeps only these and its sinks, past max_model_len")

    def __post_init__(self):
        for name in ("block_size", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens", "swap_space"):
            _check_int(name, getattr(self, name))
        _check_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        _check_int("max_model_len", self.max_model_len, allow_none=True)
        _check_int("attention_sinks", self.attention_sinks, low=0)
        _check_int("streaming_window", self.streaming_window, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):  # any int: torch takes negative seeds
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.preemption not in PREEMPTION:
            raise ValueError(f"preemption must be one of {PREEMPTION}, got {self.preemption!r}")
        object.__setattr__(self, "dtype", _dtype(self.dtype))
        if not isinstance(self.kv_cache_dtype, str) or self.kv_cache_dtype not in KV_FORMATS:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_FORMATS)}, got {self.kv_cache_dtype!r}")
        object.__setattr__(self, "device", _device(self.device))

    def streaming_policy(self):
        """The StreamingLLM policy (``engine.streaming.StreamingPolicy``) or None; the options that go together
        are checked here (each flag alone is valid, so that the command line can parse them one by one)."""
        if self.streaming_window is None:
            if self.attention_sinks:
                raise ValueError(f"attention_sinks = {self.attention_sinks} needs a streaming_window (the recent "
                                 "tokens kept beside the sinks)")
            return None
        if self.preemption == "swap":
            raise ValueError("streaming_window supports preemption 'recompute' only (a sequence's early blocks are "
                             "freed as it goes, so there is no whole sequence to swap)")
        from .streaming import StreamingPolicy

        return StreamingPolicy(self.attention_sinks, self.streaming_window, self.block_size)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (vLLM's names).

    n: completions per prompt (they share the prompt's KV blocks). temperature: 0 = greedy.
    top_k: -1 or 0 = off. top_p: in (0, 1]. seed: per-request generator (reproducible regardless of the
    batch). max_tokens: new tokens at most. stop_token_ids: extra tokens that end a completion.
    ignore_eos: keep going past EOS. return_logits (memattn): keep each step's logits row in the output.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple = field(default_factory=tuple)
    ignore_eos: bool = False
    return_logits: bool = False

    def __post_init__(self):
        _check_int("n", self.n)
        _check_int("max_tokens", self.max_tokens)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or a positive int, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("seed", self.seed, low=0, allow_none=True)
        stop = tuple(self.stop_token_ids)
        for t in stop:
            _check_int("stop token id", t, low=0)
        object.__setattr__(self, "stop_token_ids", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


__all__ = ["ModelConfig", "EngineConfig", "SamplingParams"]
