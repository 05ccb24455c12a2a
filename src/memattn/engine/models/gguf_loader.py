"""Load a GGUF file (llama.cpp's format): the config from its metadata, the tokenizer from its vocabulary, and
every tensor dequantised into the engine's dtype, one tensor at a time.

The model is built with untouched, uninitialised parameters (``loader.empty_model``); each engine parameter is
allocated anew on the target device when the first GGUF tensor feeding it is read, then filled a few MiB of rows
at a time (a fused ``qkv_proj`` / ``gate_up_proj`` takes its parts' rows in turn). So the load holds the final
weights, the file's mapped pages and one small chunk of dequantised rows, never a whole float state dict.

What GGUF does differently from a Hugging Face checkpoint, undone here:
- llama.cpp permutes the rows of llama's q/k projections (interleaved rotary pairs instead of rotate-half halves):
  ``convert_hf_to_gguf.py``'s ``permute`` reshapes rows to (heads, 2, head_dim / 2) and swaps the last two axes;
  we swap them back. Qwen2 files are not permuted (llama.cpp runs them with NeoX rotary).
- gpt2's Conv1D weights are stored (out, in) like a Linear; the engine's Conv1D wants (in, out).
- a tied model has no ``output.weight`` (gpt2 files usually repeat token_embd there: byte-identical, so tied).

Only ``gguf`` (reading, dequantising) and ``tokenizers`` are used; transformers is never imported.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig

ARCHS = ("llama", "mistral", "qwen2", "gpt2")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6

# pre-tokenizer splits by tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp); anything else gets GPT-2's regex
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# every digit alone, then GPT-2's regex (llama.cpp's starcoder/refact/smollm pre-tokenizers; the Hugging Face
# tokenizer.json of these models: Digits(individual_digits) + ByteLevel)
_PRE_DIGITS = ("smollm", "starcoder", "refact")


def _fail(path: str, problem: str) -> ValueError:
    return ValueError(f"GGUF file {path}: {problem}")


# ----------------------------------------------------------------------------------------------- reading

def _reader(path: str):
    """A ``gguf.GGUFReader`` of path whose metadata parse is about 3x faster (see ``_get``); errors name the file."""
    import gguf

    class Reader(gguf.GGUFReader):
        # GGUFReader slices its np.memmap once per metadata value (twice per vocabulary string); each slice of a
        # memmap pays for memmap's __array_finalize__. A plain ndarray view of the same mapping reads the same
        # bytes without that cost. Same contract as GGUFReader._get (gguf 0.x).
        def _get(self, offset, dtype, count=1, override_order=None):
            data = self.data
            if type(data) is not np.ndarray:
                self.data = data = data.view(np.ndarray)
            dt = np.dtype(dtype)
            count = int(count)
            arr = data[offset:offset + dt.itemsize * count].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(dt.newbyteorder(order))

    try:
        return Reader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError... on a damaged file
        raise _fail(path, f"not a readable GGUF file ({type(e).__name__}: {e})") from None


class _Meta:
    """Typed access to a reader's metadata fields."""

    def __init__(self, reader, path: str):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key):
        return key in self.fields

    def get(self, key, default=None):
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            if len(f.types) > 1:  # an array
                return self.strings(key) if f.types[1].name == "STRING" else [p.item() for p in
                                                                             (f.parts[i][0] for i in f.data)]
            if f.types[0].name == "STRING":
                return bytes(f.parts[f.data[0]]).decode("utf-8")
            return f.parts[f.data[0]][0].item()
        except Exception as e:
            raise _fail(self.path, f"metadata {key!r} is unreadable ({e})") from None

    def strings(self, key) -> list[str]:
        f = self.fields[key]
        parts = f.parts
        return [bytes(parts[i]).decode("utf-8", errors="replace") for i in f.data]

    def need(self, key):
        value = self.get(key)
        if value is None:
            raise _fail(self.path, f"metadata {key!r} is missing")
        return value


# ----------------------------------------------------------------------------------------------- config

def _config(meta: _Meta, arch: str, names: set, tie: bool, path: str) -> ModelConfig:
    a = arch
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = tuple(dict.fromkeys(i for i in (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
                              if i is not None))
    vocab = meta.get(f"{a}.vocab_size")
    if vocab is None:
        vocab = len(meta.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in meta else None
    if vocab is None:
        raise _fail(path, f"neither {a}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    hidden, layers = meta.need(f"{a}.embedding_length"), meta.need(f"{a}.block_count")
    heads = meta.need(f"{a}.attention.head_count")
    ctx = meta.get(f"{a}.context_length", 2048)
    ffn = meta.need(f"{a}.feed_forward_length")
    if arch == "gpt2":
        build = lambda: ModelConfig(  # noqa: E731
            "gpt2", vocab, hidden, layers, heads, heads, ffn, ctx,
            norm_eps=meta.get(f"{a}.attention.layer_norm_epsilon", 1e-5), tie_word_embeddings=tie,
            hidden_act="gelu_new", bos_token_id=bos, eos_token_ids=eos, model_type="gpt2")
    else:
        kv = meta.get(f"{a}.attention.head_count_kv") or heads
        head_dim = meta.get(f"{a}.attention.key_length") or meta.get(f"{a}.rope.dimension_count")
        kind = meta.get(f"{a}.rope.scaling.type")
        scaling = None
        if kind == "linear":
            scaling = dict(rope_type="linear", factor=float(meta.need(f"{a}.rope.scaling.factor")))
        elif kind not in (None, "none"):
            raise _fail(path, f"rope scaling {kind!r} is not supported (none, linear; llama3 via rope_freqs)")
        # qwen2's window is off unless use_sliding_window (which GGUF does not carry): only llama/mistral take it
        window = meta.get(f"{a}.attention.sliding_window") if arch != "qwen2" else None
        build = lambda: ModelConfig(  # noqa: E731
            "llama", vocab, hidden, layers, heads, kv, ffn, ctx, head_dim=head_dim,
            norm_eps=meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=float(meta.get(f"{a}.rope.freq_base", 1e6 if arch == "qwen2" else 1e4)),
            rope_scaling=scaling, windows=(window,) * layers if window else (),
            qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names, tie_word_embeddings=tie, hidden_act="silu",
            bos_token_id=bos, eos_token_ids=eos, model_type="mistral" if arch == "mistral" else arch)
    try:
        return build()
    except ValueError as e:
        raise _fail(path, f"its metadata gives an invalid model shape ({e})") from None


# ----------------------------------------------------------------------------------------------- tensor map

def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: rows (heads, 2, d/2) in the file -> (heads, d/2, 2) -> HF's order.

    convert_hf_to_gguf.py writes ``w.reshape(heads, 2, d // 2, ...).swapaxes(1, 2)``: each head's rows in
    interleaved pairs; reshaping the file's rows as (heads, d/2, 2) and swapping back restores rotate-half halves."""
    shape = w.shape
    return w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _targets(cfg: ModelConfig, arch: str):
    """{gguf name: (engine parameter name, its rows this tensor fills or None for all, transform)}.

    transform: None, "t" (stored transposed: gpt2's Conv1D) or the head count to unpermute the rows by."""
    out = {}
    if cfg.arch == "gpt2":
        t = "t"  # (out, in) in the file -> Conv1D's (in, out)
        out.update({"token_embd.weight": ("transformer.wte.weight", None, None),
                    "position_embd.weight": ("transformer.wpe.weight", None, None),
                    "output_norm.weight": ("transformer.ln_f.weight", None, None),
                    "output_norm.bias": ("transformer.ln_f.bias", None, None),
                    "output.weight": ("lm_head.weight", None, None)})
        for i in range(cfg.num_layers):
            p = f"transformer.h.{i}."
            for g, e, tr in (("attn_norm", "ln_1", None), ("ffn_norm", "ln_2", None), ("attn_qkv", "attn.c_attn", t),
                             ("attn_output", "attn.c_proj", t), ("ffn_up", "mlp.c_fc", t),
                             ("ffn_down", "mlp.c_proj", t)):
                out[f"blk.{i}.{g}.weight"] = (p + e + ".weight", None, tr)
                out[f"blk.{i}.{g}.bias"] = (p + e + ".bias", None, None)
        return out
    h, hkv, d, n = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    permuted = arch != "qwen2"
    q_tr, k_tr = (h, hkv) if permuted else (None, None)
    out.update({"token_embd.weight": ("model.embed_tokens.weight", None, None),
                "output_norm.weight": ("model.norm.weight", None, None),
                "output.weight": ("lm_head.weight", None, None)})
    qkv = (("attn_q", slice(0, h * d), q_tr), ("attn_k", slice(h * d, (h + hkv) * d), k_tr),
           ("attn_v", slice((h + hkv) * d, (h + 2 * hkv) * d), None))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_norm.weight"] = (p + "input_layernorm.weight", None, None)
        out[f"blk.{i}.ffn_norm.weight"] = (p + "post_attention_layernorm.weight", None, None)
        for kind in ("weight", "bias"):
            a, m = p + "self_attn.", p + "mlp."
            for g, rows, tr in qkv:
                out[f"blk.{i}.{g}.{kind}"] = (f"{a}qkv_proj.{kind}", rows, tr)
            out[f"blk.{i}.attn_output.{kind}"] = (f"{a}o_proj.{kind}", None, None)
            out[f"blk.{i}.ffn_gate.{kind}"] = (f"{m}gate_up_proj.{kind}", slice(0, n), None)
            out[f"blk.{i}.ffn_up.{kind}"] = (f"{m}gate_up_proj.{kind}", slice(n, 2 * n), None)
            out[f"blk.{i}.ffn_down.{kind}"] = (f"{m}down_proj.{kind}", None, None)
    return out


# ----------------------------------------------------------------------------------------------- dequantising

def _check_types(tensors, path: str):
    """Every tensor type dequantisable by gguf.quants (tried once per type on one zero block)."""
    import gguf

    for qtype in {t.tensor_type for t in tensors}:
        block, size = gguf.GGML_QUANT_SIZES.get(qtype, (None, None))
        try:
            if block is None:
                raise NotImplementedError
            gguf.quants.dequantize(np.zeros(size, dtype=np.uint8), qtype)
        except NotImplementedError:
            users = [t.name for t in tensors if t.tensor_type == qtype]
            raise _fail(path, f"tensor type {qtype.name} (of {users[0]} and {len(users) - 1} more) cannot be "
                              "dequantised by the gguf package") from None


_CHUNK_BYTES = 16 << 20  # float32 bytes dequantised at a time (gguf.quants holds about twice its output)


def _shape(t) -> tuple:
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _check_bytes(t, path: str) -> None:
    import gguf

    shape = _shape(t)
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    n = int(np.prod(shape, dtype=np.int64))
    if not shape or shape[-1] % block or t.data.nbytes != n // block * size:
        raise _fail(path, f"tensor {t.name} ({t.tensor_type.name}, shape {shape}) holds {t.data.nbytes} bytes, "
                          f"expected {n // block * size} (truncated or corrupt)")


def _dequantize(t, path: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows start:stop (first axis of torch's shape, the reversed ggml one) of a tensor, dequantised: a float32
    CPU tensor (F16 stays float16, converted by the copy into the parameter)."""
    import gguf

    shape = _shape(t)
    data = t.data.reshape(shape[0], -1)[start:stop] if len(shape) > 1 else t.data
    if t.tensor_type == gguf.GGMLQuantizationType.F16:
        arr = data.view(np.float16)
    else:
        try:
            arr = gguf.quants.dequantize(data, t.tensor_type)
        except Exception as e:
            raise _fail(path, f"tensor {t.name} ({t.tensor_type.name}) does not dequantise ({e})") from None
    with warnings.catch_warnings():  # a read-only mmap view: we only read it (copied into the parameter)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).reshape((data.shape[0],) + shape[1:] if len(shape) > 1 else shape)


def _copy_in(dest: torch.Tensor, t, transform, path: str) -> None:
    """Dequantise t into dest (a parameter or its rows), a few MiB of rows at a time; transform as _targets'."""
    shape = _shape(t)
    if transform == "t":
        dest = dest.t()  # Conv1D's (in, out) seen as the file's (out, in)
    if len(shape) == 1:
        dest.copy_(_dequantize(t, path))
        return
    unit = shape[0] // transform if isinstance(transform, int) else 1  # unpermute whole heads
    step = max(1, _CHUNK_BYTES // (4 * int(np.prod(shape[1:]))) // unit) * unit
    for r0 in range(0, shape[0], step):
        w = _dequantize(t, path, r0, r0 + step)
        if isinstance(transform, int):
            w = _unpermute(w, w.shape[0] // unit)
        dest[r0:r0 + w.shape[0]].copy_(w)


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    if not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    model.get_submodule(owner)._parameters[leaf] = value


def _load_weights(model, reader, cfg: ModelConfig, arch: str, path: str, dtype, device) -> None:
    shapes = dict(model.named_parameters(remove_duplicate=False))
    targets = _targets(cfg, arch)
    tensors = {t.name: t for t in reader.tensors}
    if cfg.tie_word_embeddings:
        tensors.pop("output.weight", None)  # a copy of token_embd (see _tied)
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    unknown = [n for n in tensors if n not in targets]
    if unknown:
        raise _fail(path, f"tensors {unknown[:5]} ({len(unknown)} in all) have no place in a {arch} model")
    filled = {}  # engine parameter -> rows filled so far
    for name, t in tensors.items():
        pname, rows, transform = targets[name]
        if pname not in shapes:
            raise _fail(path, f"tensor {name} has no place in this {arch} model (its config has no {pname})")
        full = tuple(shapes[pname].shape)
        want = full if rows is None else (rows.stop - rows.start,) + full[1:]
        shape = _shape(t)[::-1] if transform == "t" else _shape(t)
        if shape != want:
            raise _fail(path, f"tensor {name} has shape {shape}, the model (from the file's metadata) wants {want}"
                              f"{'' if rows is None else f' (rows {rows.start}:{rows.stop} of {pname} {full})'}")
        _check_bytes(t, path)
        if pname not in filled:
            _set_param(model, pname, torch.empty(full, dtype=dtype, device=device))
            filled[pname] = 0
        param = model.get_parameter(pname)
        with torch.no_grad():
            _copy_in(param if rows is None else param[rows], t, transform, path)
        filled[pname] += full[0] if rows is None else rows.stop - rows.start
    if cfg.tie_word_embeddings:
        emb = "transformer.wte.weight" if cfg.arch == "gpt2" else "model.embed_tokens.weight"
        if emb in filled:
            _set_param(model, "lm_head.weight", model.get_parameter(emb))
            filled["lm_head.weight"] = shapes["lm_head.weight"].shape[0]
    missing = [n for n, p in shapes.items() if filled.get(n) != p.shape[0]]
    if missing:
        raise _fail(path, f"tensors for {missing[:5]} ({len(missing)} in all) are missing or incomplete")
    if cfg.arch == "llama":
        from .common import rope_inv_freq

        inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if rope_freqs is not None:  # llama3-style scaling written as per-frequency divisors
            _check_bytes(rope_freqs, path)
            f = _dequantize(rope_freqs, path).float().reshape(-1)
            if f.numel() != inv.numel():
                raise _fail(path, f"rope_freqs has {f.numel()} entries, head_dim {cfg.head_dim} wants {inv.numel()}")
            inv = inv / f
        model.inv_freq = inv.to(device)


def _tied(tensors: dict) -> bool:
    """No output.weight, or one byte-identical to token_embd (llama.cpp's gpt2 files repeat it): tie them."""
    out, emb = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if out is None:
        return True
    return emb is not None and out.tensor_type == emb.tensor_type and out.data.nbytes == emb.data.nbytes and \
        bool(np.array_equal(out.data.reshape(-1).view(np.uint8), emb.data.reshape(-1).view(np.uint8)))


# ----------------------------------------------------------------------------------------------- tokenizer

def _byte_alphabet() -> dict:
    """GPT-2's byte -> printable character map (byte-level BPE spells every token in these 256 characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _spm_merges(tokens, scores, vocab) -> list:
    """SentencePiece-BPE merges implied by the scores (no merges in the file): every split of a token into two
    vocabulary pieces, best-scored token first (ties: shorter left piece, then lower ids)."""
    found = []
    for tok, score in zip(tokens, scores):
        local = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in vocab and tok[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((score, len(lr[0]), len(lr[1]), lr) for lr in local)
    found.sort(key=lambda x: x[:3], reverse=True)
    return [x[3] for x in found]


def _tokenizer(meta: _Meta, path: str):
    """The file's vocabulary as an ``HFTokenizer`` (a ``tokenizers.Tokenizer`` inside), None if it has none."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from .loader import HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        return None
    tokens = meta.strings("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise _fail(path, f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.strings("tokenizer.ggml.merges")] \
        if "tokenizer.ggml.merges" in meta else None
    if kind == "gpt2":
        spell = _byte_alphabet()
        alphabet = set(spell.values())
        vocab = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8")), i)
        tok_obj = Tokenizer(models.BPE(vocab, merges or [], continuing_subword_prefix="", end_of_word_suffix="",
                                       fuse_unk=False, byte_fallback=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre in _PRE_SPLITS:
            tok_obj.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in _PRE_DIGITS:
            tok_obj.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        else:
            tok_obj.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok_obj.decoder = decoders.ByteLevel()
        special = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        add_bos_default = False
    elif kind == "llama":
        vocab = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        if merges is None:
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise _fail(path, "a llama (SentencePiece) vocabulary needs tokenizer.ggml.scores or merges")
            merges = _spm_merges(tokens, scores, vocab)
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        tok_obj = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tok_obj.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok_obj.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        special = [t for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)]
        add_bos_default = True
    else:
        raise _fail(path, f"tokenizer model {kind!r} is not supported (gpt2, llama)")
    if special:
        tok_obj.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok_obj.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return HFTokenizer(tok_obj, chat_template=meta.get("tokenizer.chat_template"), bos_token=token("bos"),
                       eos_token=token("eos"), add_bos_token=add_bos_default if add_bos is None else bool(add_bos))


# ----------------------------------------------------------------------------------------------- entry point

def load_gguf(path: str, *, dtype=torch.float32, device="cpu"):
    """(model, config, tokenizer or None) from a GGUF file: llama (SmolLM2, Mistral-style), qwen2 or gpt2,
    any tensor type ``gguf.quants`` dequantises, weights in ``dtype`` on ``device``."""
    from .loader import empty_model

    path = os.fspath(path)
    reader = _reader(path)
    meta = _Meta(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise _fail(path, f"architecture {arch!r} is not supported; choose from {ARCHS}")
    _check_types(reader.tensors, path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config(meta, arch, set(tensors), _tied(tensors), path)
    tokenizer = _tokenizer(meta, path)
    model = empty_model(cfg)
    _load_weights(model, reader, cfg, arch, path, dtype, device)
    return model.to(device=device, dtype=dtype).eval(), cfg, tokenizer


__all__ = ["load_gguf", "ARCHS"]
