"""Next-token sampling: greedy, temperature, top-k, top-p, each request with its own generator."""
from __future__ import annotations

import torch

from .config import SamplingParams


def make_generator(params: SamplingParams, index: int = 0) -> torch.Generator | None:
    """Completion `index` of a seeded request draws from its own generator seeded seed + index, so its
    tokens do not depend on what else is in the batch. Unseeded requests share the global generator."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator().manual_seed(params.seed + index)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (V,) float32 -> temperature-scaled logits with everything outside top-k / top-p at -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.index_put((order[drop],), torch.tensor(float("-inf")))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn from probs (V,) (non-negative, not necessarily normalised), by inverting its cumulative
    sum at a uniform draw: the categorical distribution ``torch.multinomial(probs, 1)`` samples, at a small
    fraction of its cost over a large vocabulary (the cumulative sum in float64, so no token's share rounds
    away). Zero-probability tokens are never drawn."""
    cdf = probs.to(torch.float64).cumsum(0)
    u = torch.rand((1,), generator=generator, dtype=torch.float64) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= probs.shape[0] or probs[i] <= 0:  # u landed on the total (rounding): the last token with mass
        i = int(torch.nonzero(probs > 0)[-1])
    return i


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of logits (R, V): argmax for greedy rows, a draw from the filtered softmax otherwise."""
    if not len(params):
        return []
    tokens = logits.argmax(-1).tolist()
    for r, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[r] = draw(filter_logits(logits[r], p).softmax(-1), g)
    return tokens


__all__ = ["make_generator", "filter_logits", "draw", "sample"]
