/* One whole decode step of a Llama-family model (Llama, Mistral, Qwen2, SmolLM2) in one call, for at most
 * MAX_M rows (one new token per sequence): every layer's RMSNorm, fused qkv GEMV, RoPE, the new k/v written
 * into the paged cache, paged decode attention, o-proj, RMSNorm, gate/up GEMV, silu * up, down-proj, each
 * residual add fused with the norm after it; then the final norm and the LM head.
 *
 * Why: at batch 1 a step is bound by reading the weights once (~270-540 MB for SmolLM2-135M), but driven from
 * Python it also pays ~300 small torch ops and ctypes calls (~10 ms a step, a third of the float32 step on the
 * 2-core EPYC this was measured on). Here the same kernels run back to back: gemv() and the elementwise steps
 * of gemv.c, paged_decode() of paged_decode.c, with the rounding points of the Python path
 * (engine/models/llama.py, forward_fused), which stays beside it as the reference.
 *
 * Layouts (row-major, contiguous; "dt" = the model's dtype code, see native.h):
 *   x       (M, Dm) dt        the embeddings in; the residual stream afterwards (scratch to the caller)
 *   cos,sin (M, hd/2) dt      rotary tables of each row's position (rotate-half convention)
 *   slots   (M,) int64        cache slot (block * bs + offset) of each row's new k/v; < 0: not written
 *   kv      (2, L, NB, bs, Hkv, hd) dt   the whole paged pool (keys, then values, of every layer)
 *   table   (M, width) int32, lens (M,) int64: block table and context length (the new token included)
 *   layers  (L, LP_COUNT) int64 addresses, see the LP_ enum; a NULL bias is no bias; starts (M,) int64 are the
 *           first visible key of each row for that layer (sliding windows differ per layer)
 *   logits  (M, V) float32, rounded to dt (the Python path's logits in dt, widened: one torch op fewer, and on a
 *           loaded machine a parallel torch op can wait a whole scheduler slice for its second thread)
 */
#include <stdint.h>
#include <stdlib.h>

#include "native.h"

#define MAX_M 8

enum { LP_LN1, LP_WQKV, LP_BQKV, LP_WO, LP_BO, LP_LN2, LP_WGU, LP_BGU, LP_WDOWN, LP_BDOWN, LP_STARTS, LP_COUNT };

int decode_step_layer_fields(void) { return LP_COUNT; }

/* dst (n,) float32 = src (n,) of dtype, widened (the GEMV input) */
static void widen(int dtype, const void *src, float *dst, int64_t n) {
    if (dtype == 0) { memcpy(dst, src, (size_t)n * sizeof(float)); return; }
    for (int64_t i = 0; i < n; i++) dst[i] = load1(dtype, src, i);
}

/* Rotate the q and k heads of each row's qkv (M, (H + 2 Hkv) hd) by its cos/sin, rounding like
 * common.apply_rope (x1 cos rounded, then minus x2 sin, rounded): q (rotated, widened) into qf (M, H, hd);
 * rotated k and raw v into the layer's cache at the row's slot. */
static void rope_and_store(int dtype, const void *qkv, int64_t M, int64_t H, int64_t Hkv, int64_t hd,
                           const void *cos, const void *sin, const int64_t *slots, char *kc, char *vc, float *qf) {
    const int64_t half = hd / 2, width = (H + 2 * Hkv) * hd, es = elem_size(dtype);
    for (int64_t m = 0; m < M; m++) {
        const int64_t row = m * width;
        char *kdst = slots[m] >= 0 ? kc + slots[m] * Hkv * hd * es : NULL;
        for (int64_t h = 0; h < H + Hkv; h++) {
            const int64_t base = row + h * hd;
            for (int64_t i = 0; i < half; i++) {
                const float c = load1(dtype, cos, m * half + i), s = load1(dtype, sin, m * half + i);
                const float x1 = load1(dtype, qkv, base + i), x2 = load1(dtype, qkv, base + half + i);
                const float o1 = round_to(dtype, round_to(dtype, x1 * c) - x2 * s);
                const float o2 = round_to(dtype, round_to(dtype, x2 * c) + x1 * s);
                if (h < H) {
                    qf[(m * H + h) * hd + i] = o1;
                    qf[(m * H + h) * hd + half + i] = o2;
                } else if (kdst) {
                    store1(dtype, kdst, (h - H) * hd + i, o1);
                    store1(dtype, kdst, (h - H) * hd + half + i, o2);
                }
            }
        }
        if (slots[m] >= 0)
            memcpy(vc + slots[m] * Hkv * hd * es, (const char *)qkv + (row + (H + Hkv) * hd) * es,
                   (size_t)(Hkv * hd * es));
    }
}

/* Returns 0, 1 for bad sizes, 2 when scratch memory could not be allocated, or the failing kernel's code
 * plus 10. */
int llama_decode_step(int dtype, int64_t M, int64_t L, int64_t Dm, int64_t H, int64_t Hkv, int64_t hd, int64_t I,
                      const int64_t *layers, float eps, void *x, const void *cos, const void *sin,
                      const int64_t *slots, void *kv, int64_t NB, int64_t bs, const int32_t *table, int64_t width,
                      const int64_t *lens, float scale, int64_t nsplit, int64_t per, const void *norm_w,
                      const void *lm_head, int64_t V, float *logits, int nthreads) {
    if (dtype < 0 || dtype > 2 || M < 1 || M > MAX_M || L < 1 || Dm < 1 || H < 1 || Hkv < 1 || H % Hkv || hd < 2 ||
        hd % 2 || I < 1 || V < 1 || NB < 1 || bs < 1 || nsplit < 1 || per < 1)
        return 1;
    const int64_t es = elem_size(dtype), nqkv = (H + 2 * Hkv) * hd, widest = Dm > I ? (Dm > H * hd ? Dm : H * hd)
                                                                                    : (I > H * hd ? I : H * hd);
    const int64_t layer_elems = NB * bs * Hkv * hd;
    /* dtype scratch: delta, h, a (M, Dm) each, qkv (M, nqkv), gu (M, 2I), act (M, I), head (M, V) unless
     * float32; float32: xf (M, widest), qf and attn (M, H hd), lse (M, H) */
    const int64_t n_dt = M * (3 * Dm + nqkv + 3 * I + (dtype ? V : 0)), n_f = M * (widest + 2 * H * hd + H);
    char *scratch = malloc((size_t)(n_dt * es + n_f * 4 + 64));
    if (!scratch) return 2;
    char *delta = scratch, *h = delta + M * Dm * es, *a = h + M * Dm * es, *qkv = a + M * Dm * es;
    char *gu = qkv + M * nqkv * es, *act = gu + M * 2 * I * es, *head = act + M * I * es;
    float *xf = (float *)(((uintptr_t)(head + (dtype ? M * V * es : 0)) + 63) & ~(uintptr_t)63);
    float *qf = xf + M * widest, *attn = qf + M * H * hd, *lse = attn + M * H * hd;
    int rc = 0;
    for (int64_t l = 0; l < L && !rc; l++) {
        const int64_t *P = layers + l * LP_COUNT;
        char *kc = (char *)kv + l * layer_elems * es, *vc = (char *)kv + (L + l) * layer_elems * es;
        add_rms_norm(dtype, x, l ? delta : NULL, (const void *)P[LP_LN1], h, M, Dm, eps);
        widen(dtype, h, xf, M * Dm);
        if ((rc = gemv(dtype, dtype, xf, M, (const void *)P[LP_WQKV], nqkv, Dm, (const float *)P[LP_BQKV], qkv,
                       nthreads)))
            break;
        rope_and_store(dtype, qkv, M, H, Hkv, hd, cos, sin, slots, kc, vc, qf);
        if ((rc = paged_decode(dtype, qf, kc, vc, table, width, lens, (const int64_t *)P[LP_STARTS], M, H, Hkv, hd,
                               bs, scale, 0.0f, NULL, nsplit, per, attn, lse, nthreads)))
            break;
        for (int64_t i = 0; i < M * H * hd; i++) attn[i] = round_to(dtype, attn[i]);  /* the output in the dtype */
        if ((rc = gemv(dtype, dtype, attn, M, (const void *)P[LP_WO], Dm, H * hd, (const float *)P[LP_BO], a,
                       nthreads)))
            break;
        add_rms_norm(dtype, x, a, (const void *)P[LP_LN2], h, M, Dm, eps);
        widen(dtype, h, xf, M * Dm);
        if ((rc = gemv(dtype, dtype, xf, M, (const void *)P[LP_WGU], 2 * I, Dm, (const float *)P[LP_BGU], gu,
                       nthreads)))
            break;
        silu_mul(dtype, gu, act, M, I);
        widen(dtype, act, xf, M * I);
        rc = gemv(dtype, dtype, xf, M, (const void *)P[LP_WDOWN], Dm, I, (const float *)P[LP_BDOWN], delta, nthreads);
    }
    if (!rc) {
        add_rms_norm(dtype, x, delta, norm_w, h, M, Dm, eps);
        widen(dtype, h, xf, M * Dm);
        rc = gemv(dtype, dtype, xf, M, lm_head, V, Dm, NULL, dtype ? (void *)head : (void *)logits, nthreads);
        if (dtype) widen(dtype, head, logits, M * V);
    }
    free(scratch);
    return rc ? rc + 10 : 0;
}
