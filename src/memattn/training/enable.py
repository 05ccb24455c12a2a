"""``memattn.training.enable(model, ...)``: switch a transformers causal LM to long-context training in one call.

Three independent switches, each the fix for one cause of a training step's memory:

- ``attention``: the attention implementation ("memattn": O(S) attention and compact masks, see
  ``memattn.integrations.transformers``; "sdpa" or "eager" are accepted so a planner can compare);
- ``checkpointing``: activation checkpointing of every k-th decoder layer (``1`` every layer, ``None`` off):
  a checkpointed layer keeps only its input and recomputes the rest in backward;
- ``loss``: "chunked" computes the loss through ``linear_cross_entropy`` from the LM head's input, so the
  S x vocab logits (kept for backward, again as log-softmax, again as their gradient) never exist; "standard"
  leaves the model's own loss.

It patches the instance, not the class, and leaves the parameters and their names (``state_dict``) as they were.
"""
from __future__ import annotations

import functools

import torch

from .losses import linear_cross_entropy

ATTENTIONS = ("memattn", "sdpa", "eager")
LOSSES = ("chunked", "standard")

# config fields that change logits between the LM head and the loss in ways the chunked loss does not apply
_UNSUPPORTED_LOGIT_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


class _HeadCapture:
    """While active, the LM head returns an empty (..., 0) tensor and keeps its input instead of computing logits."""

    def __init__(self):
        self.active = False
        self.hidden = None


def _decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _check_switchable(model, attention, checkpointing, loss):
    """Raise naming what is missing when `model` cannot take the asked switches."""
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - the hf extra is missing
        raise ImportError("memattn.training.enable needs transformers (pip install 'memattn[hf]')") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"enable() takes a transformers PreTrainedModel, got {type(model).__name__}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if checkpointing is not None and (isinstance(checkpointing, bool) or not isinstance(checkpointing, int)
                                      or checkpointing < 1):
        raise ValueError(f"checkpointing must be None (off) or an int k >= 1 (every k-th layer), got {checkpointing!r}")
    name = type(model).__name__
    if attention != "eager" and not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{name} does not route attention through transformers' ALL_ATTENTION_FUNCTIONS "
                         f"(_supports_attention_backend is False): attention={attention!r} cannot be set")
    if checkpointing is not None and not (model.supports_gradient_checkpointing and _decoder_layers(model)):
        raise ValueError(f"{name} has no GradientCheckpointingLayer decoder layers: checkpointing cannot be set")
    if loss == "chunked":
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"{name} has no nn.Linear LM head (get_output_embeddings() gave "
                             f"{type(head).__name__}): loss='chunked' needs one")
        cfg = model.config
        bad = [f for f in _UNSUPPORTED_LOGIT_FIELDS if getattr(cfg, f, None) not in (None, 1, 1.0)]
        if bad:
            raise ValueError(f"{name}'s config scales its logits ({', '.join(bad)}); loss='chunked' does not apply "
                             "that scaling: use loss='standard'")


def _set_checkpointing(model, every: int | None) -> None:
    layers = _decoder_layers(model)
    if every is None:
        on = getattr(model, "is_activation_checkpointing", None)
        if on is None:  # transformers < 5
            on = model.is_gradient_checkpointing
        if on:
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        return
    kwargs = {"use_reentrant": False}  # non-reentrant: keyword arguments (masks, positions) pass through
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
    model.config.use_cache = False  # a cache is useless in training and checkpointing refuses one


def _set_release(model, state, on: bool) -> None:
    """After each decoder layer's forward (and its recompute in backward), return freed heap pages to the
    system (``memory.release_freed_memory``): measured on SmolLM2-135M at S = 4096 (AdamW, checkpointing
    every layer), the step's peak RSS fell from 4.9 to 3.9 GiB, the heap's holes between kept tensors."""
    from ..memory import release_freed_memory

    for handle in state.pop("release_hooks", ()):
        handle.remove()
    if on:
        def release(*_):   # returns None: a forward hook's result would replace the layer's output
            release_freed_memory()

        state["release_hooks"] = [layer.register_forward_hook(release) for layer in _decoder_layers(model)]


def _chunked_forward(model, original_forward, capture: _HeadCapture, chunk):
    """The model's forward with labels routed through the chunked loss (logits not returned unless asked)."""
    softcap = getattr(model.config, "final_logit_softcapping", None)

    @functools.wraps(original_forward)
    def forward(*args, labels=None, return_logits=False, num_items_in_batch=None, shift_labels=None, **kwargs):
        if labels is None and shift_labels is None:
            return original_forward(*args, **kwargs)
        capture.active, capture.hidden = True, None
        try:
            out = original_forward(*args, **kwargs)
        finally:
            capture.active = False
        hidden, capture.hidden = capture.hidden, None
        if hidden is None:
            raise RuntimeError(f"{type(model).__name__}.forward never called its LM head: loss='chunked' cannot "
                               "take its input")
        head = model.get_output_embeddings()
        targets, shift = (shift_labels, False) if shift_labels is not None else (labels, True)
        loss = linear_cross_entropy(hidden, head.weight, targets.to(hidden.device), bias=head.bias, chunk=chunk,
                                    shift=shift, num_items_in_batch=num_items_in_batch, softcap=softcap)
        aux = getattr(out, "aux_loss", None)   # mixture-of-experts balance loss, added as the model would
        if aux is not None:
            loss = loss + getattr(model.config, "router_aux_loss_coef", 0.0) * aux.to(loss.device)
        out["loss"] = loss
        out["logits"] = _logits(head, hidden, softcap) if return_logits else None
        return out

    return forward


def _logits(head, hidden, softcap):
    logits = head(hidden)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def enable(model, *, attention: str = "memattn", checkpointing: int | None = None, loss: str = "chunked",
           chunk: int | None = None, release_memory: bool = True):
    """Switch a transformers causal LM for long-context training; returns the model (patched in place).

    Args:
        model: a transformers ``PreTrainedModel`` causal LM (Llama, Qwen2, Gemma 2, GPT-2, gpt-oss, ...).
        attention: "memattn" (registers it), "sdpa" or "eager".
        checkpointing: None (off), 1 (every decoder layer) or k (layers 0, k, 2k, ...).
        loss: "chunked": with ``labels`` (B, S) (or ``shift_labels``), the loss is
            ``linear_cross_entropy(hidden (B, S, H), lm_head.weight (V, H), labels, shift=True)``, the model's
            final logit softcap applied, mixture-of-experts aux loss added; ``logits`` is None unless
            ``return_logits=True`` is passed to forward. "standard": the model's own loss path.
        chunk: rows of the chunked loss per step (default: ``linear_cross_entropy``'s).
        release_memory: after each decoder layer's forward (its recompute in backward included), hand the
            C heap's freed pages back to the system (glibc ``malloc_trim``; a no-op elsewhere), so the
            process's resident memory follows its live tensors, not the heap's holes between them.
    Calling it again replaces the earlier switches.
    """
    _check_switchable(model, attention, checkpointing, loss)
    if attention == "memattn":
        from ..integrations.transformers import register

        register()
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    _set_checkpointing(model, checkpointing)

    head = model.get_output_embeddings()
    state = model.__dict__.get("_memattn_training")
    if state is None:
        capture = _HeadCapture()
        original_forward, original_head = model.forward, head.forward

        def head_forward(x):
            if capture.active:
                capture.hidden = x
                return x.new_empty(*x.shape[:-1], 0)
            return original_head(x)

        head.forward = head_forward
        state = model._memattn_training = dict(capture=capture, forward=original_forward)
    if loss == "chunked":
        model.forward = _chunked_forward(model, state["forward"], state["capture"], chunk)
    else:
        model.forward = state["forward"]
    _set_release(model, state, release_memory)
    state.update(attention=attention, checkpointing=checkpointing, loss=loss, release_memory=release_memory)
    return model


__all__ = ["enable", "ATTENTIONS", "LOSSES"]
