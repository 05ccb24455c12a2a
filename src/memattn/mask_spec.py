"""Parse a mask from text (``memattn masks show SPEC``) and draw its block layout.

SPEC is a small expression over the mask factories of ``memattn.masks`` and ``&`` / ``|``:
``causal()``, ``sliding_window(256, 0)``, ``global_tokens([0, 1])``, ``bigbird(64, 3, 1, 2, 0)``,
``strided(128)``, ``fixed(128, 16)``, ``document([100, 300, 624])``, e.g.
``"sliding_window(127, 0) | global_tokens([0])"``. Only these calls with literal arguments
are accepted (the text is parsed, never evaluated as Python).
"""
from __future__ import annotations

import ast

import torch

from . import masks

FACTORIES = {name: getattr(masks, name) for name in
             ("causal", "sliding_window", "global_tokens", "bigbird", "strided", "fixed", "document")}


def parse(spec: str) -> masks.Mask:
    """Mask object for `spec`; ValueError naming the offending part otherwise."""
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse mask spec {spec!r}: {e.msg}") from None
    return _build(tree.body, spec)


def _build(node, spec):
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
        a, b = _build(node.left, spec), _build(node.right, spec)
        return a & b if isinstance(node.op, ast.BitAnd) else a | b
    if isinstance(node, ast.Name) and node.id in FACTORIES:  # "causal" without parentheses
        return FACTORIES[node.id]()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FACTORIES:
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except ValueError:
            raise ValueError(f"mask spec {spec!r}: arguments of {node.func.id}() must be literals") from None
        try:
            return FACTORIES[node.func.id](*args, **kwargs)
        except TypeError as e:  # a wrong argument count or name: Python's message, given the spec's context
            if not str(e).startswith(f"{node.func.id}()"):
                raise
            raise ValueError(f"mask spec {spec!r}: {e}") from None
    raise ValueError(f"mask spec {spec!r}: unexpected {ast.unparse(node)!r}; use {', '.join(FACTORIES)} with & and |")


GLYPHS = {masks.FULL: "█", masks.PARTIAL: "▒", masks.EMPTY: "·"}


def layout(mask: masks.Mask, seq_len: int, block: int) -> torch.Tensor:
    """Block kinds (nQ, nK) of a square self-attention of `seq_len` tokens at tiles of `block`."""
    e = masks.edges(seq_len, block)
    return mask.block_kinds(seq_len, seq_len, e, e)


def render_text(kinds: torch.Tensor) -> str:
    rows = ["".join(GLYPHS[int(x)] for x in row) for row in kinds]
    counts = {k: int((kinds == k).sum()) for k in GLYPHS}
    total = kinds.numel()
    legend = (f"█ full {counts[masks.FULL]}  ▒ partial {counts[masks.PARTIAL]}  · empty {counts[masks.EMPTY]}"
              f"  ({100 * (total - counts[masks.EMPTY]) / total:.1f}% of tiles run)")
    return "\n".join(rows + [legend])


def render_png(kinds: torch.Tensor, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(kinds.numpy(), cmap=ListedColormap(["white", "tab:blue", "lightskyblue"]), vmin=0, vmax=2,
              interpolation="nearest")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.set_title(title + "\nblue: full   light: partial   white: skipped", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
