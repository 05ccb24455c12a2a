"""Triton kernels of the tile primitive (FlashAttention-2) and of paged decode.

Every kernel reads its tensors through explicit strides (the schedule hands over strided views:
query-block slices, overlapping key windows) with a unit last stride. Scores are computed in
float32 with the natural exponent; a row that sees no key keeps m = -inf and l = 0 and is
stored as out 0, lse -inf. Head dims that are not powers of two are padded to BLOCK_D and
masked. ``PREC`` is the tl.dot input precision: "ieee" for float32 inputs (no TF32 rounding),
None (the default) for half precision.

Layouts (strides passed in this order): q/dout/out (B, tq, H, D); k/v (B, tk, Hkv, D);
lse/delta (B, H, tq); mask/bias (B, H, tq, tk) with zero strides where they broadcast.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _online_step(m_i, l_i, acc, s, v, PREC: tl.constexpr):
    """Fold one chunk of scores s (rows x keys, -inf = not visible) and its values into the running
    max m_i, sum l_i and accumulator acc (rows with no visible key so far stay -inf / 0 / 0)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _normalise(m_i, l_i, acc):
    """(out, lse) from the running state: out 0 and lse -inf for rows that saw no key."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    return out, lse


@triton.jit
def _scores(q, k, offs_m, offs_n, b, h, TQ, TK, scale, softcap, Mask, Bias,
            smb, smh, smm, smn, sbb, sbh, sbm, sbn,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
            PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 scores with -inf where not visible, and tanh(raw / softcap)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    inside = (offs_m[:, None] < TQ) & (offs_n[None, :] < TK)
    if HAS_BIAS:
        s += tl.load(Bias + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                     mask=inside, other=0.0).to(tl.float32)
    visible = inside
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        mk = tl.load(Mask + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=inside, other=0)
        visible = visible & (mk != 0)
    s = tl.where(visible, s, float("-inf"))
    return s, t


@triton.jit
def tile_fwd_kernel(Q, K, V, Out, Lse, Mask, Bias,
                    sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sob, som, soh, slb, slh,
                    smb, smh, smm, smn, sbb, sbh, sbm, sbn,
                    H, G, TQ, TK, D, scale, softcap,
                    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=(offs_m[:, None] < TQ) & dmask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_in = (offs_n[:, None] < TK) & dmask
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_in, other=0.0)
        s, t = _scores(q, k, offs_m, offs_n, b, h, TQ, TK, scale, softcap, Mask, Bias,
                       smb, smh, smm, smn, sbb, sbh, sbm, sbn, CAUSAL, HAS_MASK, HAS_BIAS, SOFTCAP, PREC)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_in, other=0.0)
        m_i, l_i, acc = _online_step(m_i, l_i, acc, s, v, PREC)
    out, lse = _normalise(m_i, l_i, acc)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out,
             mask=(offs_m[:, None] < TQ) & dmask)
    tl.store(Lse + b * slb + h * slh + offs_m, lse, mask=offs_m < TQ)


@triton.jit
def tile_bwd_dq_kernel(DO, Q, K, V, Lse, Delta, DQ, Mask, Bias,
                       sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, slb, slh,
                       smb, smh, smm, smn, sbb, sbh, sbm, sbn,
                       H, G, TQ, TK, D, scale, softcap,
                       CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq of one query block over all the tile's keys. DO and DQ share q's strides."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    rows = (offs_m[:, None] < TQ) & dmask
    q_off = b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(Q + q_off, mask=rows, other=0.0)
    do = tl.load(DO + q_off, mask=rows, other=0.0)
    lse = tl.load(Lse + b * slb + h * slh + offs_m, mask=offs_m < TQ, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(Delta + b * slb + h * slh + offs_m, mask=offs_m < TQ, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_in = (offs_n[:, None] < TK) & dmask
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_in, other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_in, other=0.0)
        s, t = _scores(q, k, offs_m, offs_n, b, h, TQ, TK, scale, softcap, Mask, Bias,
                       smb, smh, smm, smn, sbb, sbh, sbm, sbn, CAUSAL, HAS_MASK, HAS_BIAS, SOFTCAP, PREC)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + q_off, dq * scale, mask=rows)


@triton.jit
def tile_bwd_dkdv_kernel(DO, Q, K, V, Lse, Delta, DK, DV, Mask, Bias,
                         sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, slb, slh,
                         smb, smh, smm, smn, sbb, sbh, sbm, sbn,
                         HKV, G, TQ, TK, D, scale, softcap,
                         CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of one key block of one kv head, summed over its G query heads and all query rows
    (so no atomics). DK/DV share k's strides."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    kv_in = (offs_n[:, None] < TK) & dmask
    k_off = b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :]
    k = tl.load(K + k_off, mask=kv_in, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_in, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # query i sees key j only if i >= j
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        for m0 in range(lo, TQ, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            rows = (offs_m[:, None] < TQ) & dmask
            q_off = b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
            q = tl.load(Q + q_off, mask=rows, other=0.0)
            do = tl.load(DO + q_off, mask=rows, other=0.0)
            lse = tl.load(Lse + b * slb + h * slh + offs_m, mask=offs_m < TQ, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(Delta + b * slb + h * slh + offs_m, mask=offs_m < TQ, other=0.0)
            s, t = _scores(q, k, offs_m, offs_n, b, h, TQ, TK, scale, softcap, Mask, Bias,
                           smb, smh, smm, smn, sbb, sbh, sbm, sbn, CAUSAL, HAS_MASK, HAS_BIAS, SOFTCAP, PREC)
            p = tl.exp(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    tl.store(DK + k_off, dk * scale, mask=kv_in)
    tl.store(DV + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], dv, mask=kv_in)


@triton.jit
def paged_decode_kernel(Q, KC, VC, Table, Lens, Starts, Slopes, Out, Lse,
                        sqb, sqh, skb, skt, skh, svb, svt, svh, stb, sob, soh, sos, slb, slh, ssb,
                        G, PAGE, TOKENS_PER_SPLIT, D, scale, softcap,
                        HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (sequence, kv head, split): the G query heads of the kv head against the split's
    tokens [start + split * TOKENS_PER_SPLIT, ...) of the sequence, read through its block
    table; writes the split's partial out (B, H, S, D) and lse (B, H, S)."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(Lens + b)
    start = tl.load(Starts + b)
    t0 = start + sp * TOKENS_PER_SPLIT
    t1 = tl.minimum(length, t0 + TOKENS_PER_SPLIT)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    heads = hk * G + offs_g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=(offs_g[:, None] < G) & dmask, other=0.0)
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * ssb + heads, mask=offs_g < G, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(t0, t1, BLOCK_T):
        tok = n0 + tl.arange(0, BLOCK_T)
        live = tok < t1
        page = tl.load(Table + b * stb + tok // PAGE, mask=live, other=0).to(tl.int64)
        slot = tok % PAGE
        ld = live[:, None] & dmask
        k = tl.load(KC + page[:, None] * skb + slot[:, None] * skt + hk * skh + offs_d[None, :], mask=ld, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if HAS_ALIBI:
            s -= slope[:, None] * (length - 1 - tok)[None, :].to(tl.float32)
        s = tl.where(live[None, :], s, float("-inf"))
        v = tl.load(VC + page[:, None] * svb + slot[:, None] * svt + hk * svh + offs_d[None, :], mask=ld, other=0.0)
        m_i, l_i, acc = _online_step(m_i, l_i, acc, s, v, PREC)
    out, lse = _normalise(m_i, l_i, acc)
    tl.store(Out + b * sob + heads[:, None] * soh + sp * sos + offs_d[None, :], out,
             mask=(offs_g[:, None] < G) & dmask)
    tl.store(Lse + b * slb + heads * slh + sp, lse, mask=offs_g < G)
