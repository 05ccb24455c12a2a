"""memattn.training.enable: one call switches attention, checkpointing and the chunked loss of a transformers
causal LM; the switched model's loss and every gradient equal eager's (float64, FA rule; see hf_training.py)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from hf_training import (NAME, ORACLE, TRAIN_CONFIGS, assert_training_matches, grads_of,  # noqa: E402
                         train_models)

from memattn import training  # noqa: E402
from memattn.training.enable import _decoder_layers  # noqa: E402

# gpt-oss with its router's balance loss switched on (enable() must add it as the model does); Gemma 2 with its
# final logit softcap (the chunked loss must apply it)
CONFIGS = dict(TRAIN_CONFIGS, gpt_oss=dict(TRAIN_CONFIGS["gpt_oss"], output_router_logits=True,
                                           router_aux_loss_coef=0.5),
               gemma2=dict(TRAIN_CONFIGS["gemma2"], final_logit_softcapping=2.0))


def _models(arch, impls, seed):
    saved = dict(TRAIN_CONFIGS)
    TRAIN_CONFIGS.update(CONFIGS)
    try:
        return train_models(arch, impls, seed)
    finally:
        TRAIN_CONFIGS.clear()
        TRAIN_CONFIGS.update(saved)


def _batch(seed, b=2, s=21):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0   # right padding
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _reference_loss(model, labels, **batch):
    """The mean causal-LM loss in float64 (transformers' own path rounds a float64 model's loss to float32),
    plus the model's router balance loss where it has one, as its forward adds it."""
    out = model(**batch, use_cache=False)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss


@pytest.mark.parametrize("arch", sorted(TRAIN_CONFIGS))
@pytest.mark.parametrize("checkpointing", [None, 1, 2])
def test_enabled_model_matches_eager(arch, checkpointing, seed):
    ours, oracle, eager = _models(arch, [NAME, ORACLE, "eager"], seed)
    training.enable(ours, checkpointing=checkpointing, loss="chunked")
    batch = _batch(seed)

    def our_loss():
        out = ours(**batch, use_cache=False)
        assert out.logits is None  # not returned unless asked
        return out.loss

    results = [grads_of(ours, our_loss), grads_of(oracle, lambda: _reference_loss(oracle, **batch)),
               grads_of(eager, lambda: _reference_loss(eager, **batch))]
    assert_training_matches(f"{arch} enable(checkpointing={checkpointing})", *results, seed)
    flags = [layer.gradient_checkpointing for layer in _decoder_layers(ours)]
    k = checkpointing
    assert flags == [k is not None and i % k == 0 for i in range(len(flags))]


def test_logits_on_request_and_inference_untouched(seed):
    ours, oracle = _models("qwen2", [NAME, ORACLE], seed)   # tied embeddings
    training.enable(ours, checkpointing=1)
    batch = _batch(seed)
    want = oracle(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    got = ours(**batch, use_cache=False, return_logits=True)
    assert got.loss is not None and torch.allclose(got.logits, want, rtol=0, atol=1e-10)
    plain = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    assert torch.allclose(plain.logits, want, rtol=0, atol=1e-10)


def test_enable_again_replaces_and_standard_restores(seed):
    (model,) = _models("llama", [NAME], seed)
    training.enable(model, checkpointing=1, loss="chunked")
    training.enable(model, attention="sdpa", checkpointing=None, loss="standard")
    assert model.config._attn_implementation == "sdpa"
    assert not any(layer.gradient_checkpointing for layer in _decoder_layers(model))
    out = model(**_batch(seed), use_cache=False)
    assert out.logits is not None and out.loss is not None


def test_refuses_what_it_cannot_switch():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        training.enable(torch.nn.Linear(3, 3))
    (model,) = _models("llama", [NAME], 0)
    with pytest.raises(ValueError, match="checkpointing"):
        training.enable(model, checkpointing=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        training.enable(model, attention="flash")
    with pytest.raises(ValueError, match="loss must be one of"):
        training.enable(model, loss="fused")
    type(model)._supports_attention_backend = False   # a model whose attention is written inline
    try:
        with pytest.raises(ValueError, match="ALL_ATTENTION_FUNCTIONS"):
            training.enable(model)
    finally:
        del type(model)._supports_attention_backend
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        training.enable(model, loss="chunked")


def test_chunked_loss_never_holds_the_logits():
    """A step's peak with the chunked loss sits below the standard loss path's by more than two S x V
    float32 logits (the standard path keeps the logits, their log-softmax and their gradient)."""
    from memattn.memory import measure

    cfg = dict(TRAIN_CONFIGS["llama"], vocab_size=16384)
    s = 1024

    def peak(loss):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg)).train()
        training.enable(model, loss=loss, chunk=128)  # 128 of the 1024 rows: the default would take them all
        ids = torch.randint(0, 16384, (1, s))
        return measure(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss.backward())

    logits = s * 16384 * 4
    chunked, standard = peak("chunked"), peak("standard")
    assert standard - chunked > 2 * logits, (chunked, standard)
