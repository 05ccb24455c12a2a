"""``memattn.linear_attention`` and ``memattn.LinearAttentionState``: validation, features, forms, readout."""
from __future__ import annotations

import torch

from ..._validate import check_dense_qkv, check_positive_int
from ...kernels import compute_dtype
from . import forms
from .feature_maps import resolve_feature_map

FORMS = ("auto", "naive", "recurrent", "chunked", "noncausal")
_CAUSAL_ONLY = ("recurrent", "chunked")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    return float(eps)


def _resolve_form(form, causal: bool) -> str:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose from {list(FORMS)}")
    if form == "auto":
        return "chunked" if causal else "noncausal"
    if not causal and form in _CAUSAL_ONLY:
        raise ValueError(f"form={form!r} is a causal form; use causal=True, or form='noncausal'/'naive'")
    if causal and form == "noncausal":
        raise ValueError("form='noncausal' needs causal=False; causal forms are 'chunked', 'recurrent', 'naive'")
    return form


def _features(phi, q: torch.Tensor, k: torch.Tensor, cd: torch.dtype, seq_dim: int):
    """phi applied once to queries and keys together (so a random map draws once per call).

    q, k: same shape except along seq_dim -> (phi(q), phi(k)) in the compute dtype.
    """
    x = torch.cat([q.to(cd), k.to(cd)], dim=seq_dim)
    f = phi(x)
    if not isinstance(f, torch.Tensor) or f.shape[:-1] != x.shape[:-1]:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"feature_map must map (..., D) {tuple(x.shape)} to (..., D_phi), got {got}")
    if f.dtype != cd:
        raise TypeError(f"feature_map returned {f.dtype}; it must keep its input dtype {cd}")
    return f.split([q.shape[seq_dim], k.shape[seq_dim]], dim=seq_dim)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    # The extra column of ones makes every form compute the normaliser z alongside kv.
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def _readout(y: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """y (..., Dv + 1) = [phi(q)^T kv, phi(q) . z] -> output (..., Dv)."""
    num, den = y[..., :-1], y[..., -1:]
    return num / (den + eps) if normalize else num


def _check_state(state, batch: int, heads: int, dphi: int, dv: int, device, name: str = "initial_state"):
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError(f"{name} must be a (kv, z) pair of tensors, got {type(state).__name__}")
    kv, z = state
    for part, t, shape in (("kv", kv, (batch, heads, dphi, dv)), ("z", z, (batch, heads, dphi))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} {part} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} {part} must have shape (batch, heads, D_phi{', Dv' if part == 'kv' else ''}) = "
                f"{shape}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} {part} must be a float tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} {part} is on {t.device} but q is on {device}")


def _join_state(kv: torch.Tensor, z: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    return torch.cat([kv.to(cd), z.to(cd).unsqueeze(-1)], dim=-1)


def _split_state(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return s[..., :-1], s[..., -1]


def linear_attention(q, k, v, *, feature_map="elu", causal=False, chunk_size=64, initial_state=None,
                     output_final_state=False, normalize=True, eps=1e-6, form="auto"):
    """Linear attention: softmax(q k^T) v replaced by phi(q) (phi(k)^T v), O(S) time and memory.

        out_i = phi(q_i)^T kv_i / (phi(q_i) . z_i + eps)
        kv_i = kv_0 + sum_{j visible} phi(k_j) v_j^T        z_i = z_0 + sum_{j visible} phi(k_j)

    where j is visible from i iff j <= i (causal) or always (causal=False). With
    normalize=False the output is phi(q_i)^T kv_i.

    Args:
        q: (B, S, H, D); k: (B, S, Hkv, D); v: (B, S, Hkv, D), H % Hkv == 0 (query head h reads
            kv head h // (H // Hkv)). float16/bfloat16/float32/float64. With causal=False the
            key length may differ from the query length; causal needs equal lengths.
        feature_map: "elu" (elu + 1), "relu", "identity", "favor" (a fresh
            ``FavorFeatures()``, seed 0), a ``FavorFeatures`` instance or any callable
            (..., D) -> (..., D_phi). It is called once per call, on queries and keys together.
        causal: token i sees tokens j <= i.
        chunk_size: chunk length C of the chunked form (intra-chunk quadratic, C x C per chunk).
        initial_state: optional (kv (B, H, D_phi, D), z (B, H, D_phi)), e.g. a previous call's final
            state; added to every prefix (causal) or to the whole sum. Differentiable.
        output_final_state: also return (kv, z) after the last token.
        normalize, eps: divide by phi(q) . z + eps.
        form: "auto" (chunked if causal, else noncausal), "naive" (quadratic with an explicit
            mask; the oracle), "recurrent" (token by token; causal only), "chunked" (causal only;
            custom backward that recomputes chunk states, so training memory is O(S D + D^2) per
            head), "noncausal" (one O(S D^2) state; causal=False only). A causal form with
            causal=False (or "noncausal" with causal=True) raises ValueError.

    Returns:
        out (B, S, H, D) in q's dtype, or (out, (kv, z)) with output_final_state. Features, states
        and sums are computed in float32 (float64 for float64 inputs), so the normaliser cannot
        overflow in half precision; the state is returned in that dtype.
    """
    check_dense_qkv(q, k, v)
    _check_flag("causal", causal)
    _check_flag("normalize", normalize)
    _check_flag("output_final_state", output_final_state)
    check_positive_int("chunk_size", chunk_size, allow_none=False)
    eps = _check_eps(eps)
    form = _resolve_form(form, causal)
    phi = resolve_feature_map(feature_map)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if causal and sq != sk:
        raise ValueError(f"causal linear attention needs seqlen_q == seqlen_k, got {sq} and {sk}")
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)

    cd = compute_dtype(q.dtype)
    # (B, S, H, D) -> (B, H, S, D): each (batch, head) is one independent sequence for the forms.
    fq, fk = _features(phi, q.transpose(1, 2), k.transpose(1, 2), cd, seq_dim=2)
    dphi = fq.shape[-1]
    n = b * h
    vv = _with_ones(v.transpose(1, 2).to(cd))
    if initial_state is None:
        s0 = torch.zeros(n, dphi, d + 1, dtype=cd, device=q.device)
    else:
        _check_state(initial_state, b, h, dphi, d, q.device)
        s0 = _join_state(*initial_state, cd).reshape(n, dphi, d + 1)
    fq, fk, vv = fq.reshape(n, sq, dphi), fk.reshape(n, sk, dphi), vv.reshape(n, sk, d + 1)

    if form == "naive":
        y, s = forms.naive(fq, fk, vv, s0, causal)
    elif form == "recurrent":
        y, s = forms.recurrent(fq, fk, vv, s0)
    elif form == "chunked":
        y, s = forms.chunked(fq, fk, vv, s0, chunk_size)
    else:
        y, s = forms.noncausal(fq, fk, vv, s0)

    out = _readout(y, normalize, eps).reshape(b, h, sq, d).transpose(1, 2).to(q.dtype)
    if not output_final_state:
        return out
    return out, _split_state(s.reshape(b, h, dphi, d + 1))


class LinearAttentionState:
    """Constant-memory decoding for causal linear attention: one (kv, z) per sequence and head.

    ``step`` adds one token and returns its output exactly as the causal ``linear_attention``
    run over the whole sequence would (up to float rounding): the state after a prefill's
    final state continues it. Memory is O(B H D_phi D) whatever the context length.

    Decoding is inference: the state is detached and updated in place; it is kept in
    float32 (float64 if given float64).

    Args:
        state: (kv (B, H, D_phi, Dv), z (B, H, D_phi)), e.g. ``linear_attention(...,
            causal=True, output_final_state=True)[1]``.
        feature_map, normalize, eps: as for ``linear_attention``; use the same ones as the
            prefill (for FAVOR+, the same instance or the same seed, in eval mode).
    """

    def __init__(self, state, *, feature_map="elu", normalize: bool = True, eps: float = 1e-6):
        if not (isinstance(state, (tuple, list)) and len(state) == 2 and isinstance(state[0], torch.Tensor)):
            raise TypeError("state must be a (kv, z) pair of tensors")
        kv = state[0]
        if kv.dim() != 4:
            raise ValueError(f"state kv must have shape (batch, heads, D_phi, Dv), got {tuple(kv.shape)}")
        b, h, dphi, dv = kv.shape
        _check_state(state, b, h, dphi, dv, kv.device, name="state")
        _check_flag("normalize", normalize)
        self.feature_map = resolve_feature_map(feature_map)
        self.normalize = normalize
        self.eps = _check_eps(eps)
        self._s = _join_state(*state, compute_dtype(kv.dtype)).detach().clone()

    @classmethod
    def zeros(cls, batch: int, heads: int, feature_dim: int, value_dim: int, *, dtype=torch.float32,
              device=None, **kwargs) -> "LinearAttentionState":
        """An empty state (no context yet); kwargs as for the constructor."""
        for name, value in (("batch", batch), ("heads", heads), ("feature_dim", feature_dim),
                            ("value_dim", value_dim)):
            check_positive_int(name, value, allow_none=False)
        kv = torch.zeros(batch, heads, feature_dim, value_dim, dtype=dtype, device=device)
        return cls((kv, kv.new_zeros(batch, heads, feature_dim)), **kwargs)

    @property
    def kv(self) -> torch.Tensor:
        """(B, H, D_phi, Dv) running sum of phi(k_j) v_j^T (a view of the live state)."""
        return self._s[..., :-1]

    @property
    def z(self) -> torch.Tensor:
        """(B, H, D_phi) running sum of phi(k_j) (a view of the live state)."""
        return self._s[..., -1]

    def step(self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """One token: q_t, k_t, v_t (B, H, D) -> out_t (B, H, Dv) in q_t's dtype; the state advances."""
        b, h, dphi, dv1 = self._s.shape
        for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[:2] != (b, h):
                raise ValueError(f"{name} must have shape (batch, heads, D) with (batch, heads) = ({b}, {h}), "
                                 f"got {tuple(t.shape)}")
        if v_t.shape[-1] != dv1 - 1:
            raise ValueError(f"v_t head_dim {v_t.shape[-1]} != the state's Dv {dv1 - 1}")
        cd = self._s.dtype
        with torch.no_grad():
            fq, fk = _features(self.feature_map, q_t.unsqueeze(-2), k_t.unsqueeze(-2), cd, seq_dim=-2)
            if fk.shape[-1] != dphi:
                raise ValueError(f"feature_map gives D_phi = {fk.shape[-1]} but the state has D_phi = {dphi}")
            s = self._s.view(b * h, dphi, dv1)
            s.baddbmm_(fk.reshape(b * h, dphi, 1), _with_ones(v_t.to(cd)).reshape(b * h, 1, dv1))
            y = torch.bmm(fq.reshape(b * h, 1, dphi), s).view(b, h, dv1)
            return _readout(y, self.normalize, self.eps).to(q_t.dtype)
