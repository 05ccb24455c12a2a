"""Build a model: from a local Hugging Face folder (config.json + safetensors, sharded or not, tokenizer.json),
from a config dict, or from a named tiny preset with random weights. Never touches the network."""
from __future__ import annotations

import json
import os

import torch

from ..config import ModelConfig
from .gpt2 import GPT2LMHeadModel
from .llama import LlamaForCausalLM

LLAMA_TYPES = ("llama", "mistral", "qwen2")

# Hugging Face config.json dicts; "tiny-*" fit the tests (hidden 64, 2 layers, vocab 320).
_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
PRESETS = {
    "tiny-llama": dict(_TINY, model_type="llama", num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0),
    "tiny-llama3": dict(_TINY, model_type="llama", num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64)),
    "tiny-mistral": dict(_TINY, model_type="mistral", num_key_value_heads=2, rms_norm_eps=1e-6, sliding_window=24),
    "tiny-qwen2": dict(_TINY, model_type="qwen2", num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                      bos_token_id=1, eos_token_id=2),
    # SmolLM2-135M's shapes (30 layers, 9 query heads, 3 kv heads, D=64) with random weights: `compare-kv`'s default
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=True),
    # about 30M parameters: the serve benchmark's model
    "llama-30m": dict(model_type="llama", vocab_size=8000, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False),
}


def _rope(hf: dict):
    """(theta, scaling) from either transformers 5's ``rope_parameters`` or the older rope_theta/rope_scaling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        kind = params.get("rope_type", "default")
        return float(params["rope_theta"]), (None if kind == "default" else dict(params))
    return float(hf.get("rope_theta", 10000.0)), hf.get("rope_scaling")


def _windows(hf: dict, layers: int) -> tuple:
    mt = hf.get("model_type")
    w = hf.get("sliding_window")
    if mt == "qwen2" and not hf.get("use_sliding_window", False):
        w = None
    if w is None:
        return ()
    types = hf.get("layer_types")
    if types:
        return tuple(w if t == "sliding_attention" else None for t in types)
    if mt == "qwen2":
        return tuple(w if i >= hf.get("max_window_layers", layers) else None for i in range(layers))
    return (w,) * layers


def _eos(hf: dict) -> tuple:
    e = hf.get("eos_token_id")
    return () if e is None else tuple(e) if isinstance(e, (list, tuple)) else (e,)


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (llama, mistral, qwen2, gpt2)."""
    mt = hf.get("model_type")
    if mt == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError("gpt2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        e = hf.get("n_embd", 768)
        act = hf.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise ValueError(f"gpt2 activation {act!r} is not supported (gelu_new)")
        return ModelConfig("gpt2", hf["vocab_size"], e, hf.get("n_layer", 12), hf.get("n_head", 12),
                           hf.get("n_head", 12), hf.get("n_inner") or 4 * e, hf.get("n_positions", 1024),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
                           hidden_act=act, bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos(hf),
                           model_type=mt)
    if mt not in LLAMA_TYPES:
        raise ValueError(f"model_type {mt!r} is not supported; choose from {LLAMA_TYPES + ('gpt2',)}")
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    return ModelConfig(
        "llama", hf["vocab_size"], hf["hidden_size"], layers, heads, hf.get("num_key_value_heads") or heads,
        hf["intermediate_size"], hf.get("max_position_embeddings", 2048), head_dim=hf.get("head_dim"),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        windows=_windows(hf, layers), qkv_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=mt != "qwen2" and bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), hidden_act=hf.get("hidden_act", "silu"),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos(hf), model_type=mt)


def build_model(cfg: ModelConfig, *, dtype=torch.float32, device="cpu", seed: int | None = 0):
    """A random-initialised model (normal(0, 0.02) weights, unit norms, zero biases)."""
    cls = GPT2LMHeadModel if cfg.arch == "gpt2" else LlamaForCausalLM
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    with torch.device("cpu"):
        model = cls(cfg)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name or "ln_" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype).eval()


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "ones_", "zeros_")


def empty_model(cfg: ModelConfig):
    """The model of cfg on the CPU, its parameters allocated but never initialised nor touched (so they take
    address space, not memory), waiting for a checkpoint's tensors to replace them.

    Not the meta device: there, the constructors' ``normal_`` and rotary arithmetic go through torch's Python
    decompositions, whose first use imports torch._dynamo (seconds, and ~130 MiB resident). The init functions of
    ``torch.nn.init`` are no-ops while the model is built (not thread-safe against another thread building a
    module at the same moment)."""
    import torch.nn.init as init

    saved = {name: getattr(init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("cpu"):
            return (GPT2LMHeadModel if cfg.arch == "gpt2" else LlamaForCausalLM)(cfg)
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _read_safetensors(folder: str) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state


def load_folder(folder: str, *, dtype=torch.float32, device="cpu"):
    """(model, config, tokenizer or None) from a local Hugging Face folder."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    gen_cfg = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_cfg):
        with open(gen_cfg) as f:
            eos = _eos(json.load(f))
        if eos:
            cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": tuple(dict.fromkeys(cfg.eos_token_ids + eos))})
    model = empty_model(cfg)
    cls = type(model)
    state = _read_safetensors(folder)
    if cfg.arch == "gpt2":
        state = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.lm_head.weight = (model.transformer.wte if cfg.arch == "gpt2" else model.model.embed_tokens).weight
    if missing or unexpected:
        raise ValueError(f"checkpoint in {folder} does not match {cls.__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if cfg.arch == "llama":
        from .common import rope_inv_freq
        model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return model.to(device=device, dtype=dtype).eval(), cfg, load_tokenizer(folder)


class ByteTokenizer:
    """For random models without a tokenizer: token id = UTF-8 byte value (needs vocab >= 256).

    Carries the same chat attributes as ``HFTokenizer`` (no template, no special tokens)."""

    chat_template = None
    bos_token = eos_token = None
    bos_token_id = eos_token_id = None
    add_bos_token = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` Tokenizer with encode/decode on plain lists, plus what chat needs.

    Attributes (the interface every engine tokenizer offers; ``ByteTokenizer`` and the GGUF tokenizer too):
        chat_template: the Jinja chat template (str) or None.
        bos_token, eos_token: their strings or None; bos_token_id, eos_token_id: ids or None.
        add_bos_token: whether ``encode(text)`` already prepends BOS (the tokenizer's post-processor does it).
    """

    def __init__(self, tokenizer, *, chat_template=None, bos_token=None, eos_token=None, add_bos_token=None):
        if isinstance(tokenizer, str):
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(tokenizer)
        self.tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = None if bos_token is None else self.tok.token_to_id(bos_token)
        self.eos_token_id = None if eos_token is None else self.tok.token_to_id(eos_token)
        # does the post-processor already prepend BOS? (then add_bos_token must not add a second one)
        ids = self.tok.encode("").ids
        processor_adds = self.bos_token_id is not None and bool(ids) and ids[0] == self.bos_token_id
        self.add_bos_token = processor_adds if add_bos_token is None else bool(add_bos_token)
        self._prepend_bos = self.add_bos_token and not processor_adds and self.bos_token_id is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        return [self.bos_token_id] + ids if add_special_tokens and self._prepend_bos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _token_str(value):
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict ({"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(folder: str):
    """The folder's tokenizer.json as an ``HFTokenizer`` (None if absent), with the chat template from
    chat_template.jinja or tokenizer_config.json's ``chat_template`` and the special tokens from the latter."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        return None
    cfg = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            template = f.read()
    return HFTokenizer(path, chat_template=template, bos_token=_token_str(cfg.get("bos_token")),
                       eos_token=_token_str(cfg.get("eos_token")), add_bos_token=cfg.get("add_bos_token"))


def load_model(model, *, dtype=torch.float32, device="cpu", seed: int = 0):
    """(model, config, tokenizer) from a folder path, a ``.gguf`` file, a preset name, a HF config dict or a
    ModelConfig."""
    if isinstance(model, str) and os.path.isdir(model):
        return load_folder(model, dtype=dtype, device=device)
    if isinstance(model, str) and model.lower().endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"GGUF file {model} does not exist")
        from .gguf_loader import load_gguf

        return load_gguf(model, dtype=dtype, device=device)
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"{model!r} is neither a local folder, a .gguf file nor a preset ({', '.join(PRESETS)})")
        model = PRESETS[model]
    cfg = model if isinstance(model, ModelConfig) else config_from_hf(dict(model))
    tok = ByteTokenizer() if cfg.vocab_size >= 256 else None
    return build_model(cfg, dtype=dtype, device=device, seed=seed), cfg, tok


__all__ = ["PRESETS", "config_from_hf", "build_model", "empty_model", "load_folder", "load_model", "load_tokenizer",
           "ByteTokenizer", "HFTokenizer"]
