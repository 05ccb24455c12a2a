/* Paged decode attention on the CPU (float32, bfloat16 or float16 caches, float32 arithmetic): one query per
 * sequence, keys and values read in place
 * through the block table (no gather copy), online softmax per block, one pass over the KV bytes.
 *
 * Built on first use by memattn/kernels/native.py (cc -O3 -march=native -fopenmp-simd -pthread) and
 * called through ctypes; no Python or torch headers, so it compiles in about a second.
 *
 * Layouts (all contiguous, row-major):
 *   q      (B, H, D)             query of each sequence
 *   kc, vc (N, bs, Hkv, D)       the block pool, float32 / bfloat16 / float16
 *   table  (B, table_width)      int32 physical block ids
 *   lens   (B,) int64            visible keys of sequence b are [starts[b], lens[b])
 *   slopes (B, H) or NULL        ALiBi: score += -slope * (lens[b] - 1 - j)
 *   out    (B, H, D), lse (B, H) float32; a sequence that sees no key gets out 0, lse -inf
 * Query head h reads kv head h / (H / Hkv).
 *
 * Work: items are (sequence, split); a split is a run of blocks of one sequence, so a few long
 * sequences still keep every thread busy (flash-decoding). Each item writes a partial (m, l, acc); a
 * second pass merges the splits of each (sequence, head). The items run on pool.c's threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

/* Blocks ahead whose loads are issued in software (0: none); the pool order of blocks is random. */
#ifndef PREFETCH
#define PREFETCH 1
#endif

/* exp(x) for x <= 0 (scores minus their running max), vectorisable: 2^n * p(r), |r| <= ln2/2,
 * degree-7 Taylor polynomial (relative error ~5e-9, below float32's epsilon). -inf and x < -87 give 0. */
static inline float exp_nonpos(float x) {
    if (!(x > -87.0f)) return 0.0f;  /* also catches -inf and NaN */
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float n = __builtin_roundf(x * log2e);
    float r = x - n * ln2_hi - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Score and value passes over one block for one kv head and its g query rows. The generic versions work
 * for any D; the NV versions (D = 8 * NV, D a compile-time constant) keep the query row, or the row's
 * accumulator, in vector registers across the block's tokens instead of reloading it per token. */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef _Float16 h8 __attribute__((vector_size(16), aligned(2)));

/* Eight or one cache elements as float32: float32 as is, bfloat16 by a 16-bit shift, float16 by conversion. */
static inline v8 load8_f32(const float *p) { return *(const v8 *)p; }
static inline v8 load8_bf16(const uint16_t *p) {
    u32x8 w = __builtin_convertvector(*(const u16x8 *)p, u32x8) << 16;
    v8 r;
    memcpy(&r, &w, sizeof r);
    return r;
}
static inline v8 load8_f16(const _Float16 *p) { return __builtin_convertvector(*(const h8 *)p, v8); }
static inline float load1_f32(const float *p) { return *p; }
static inline float load1_bf16(const uint16_t *p) {
    uint32_t w = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}
static inline float load1_f16(const _Float16 *p) { return (float)*p; }

#define GENERIC_PASSES(T, ET)                                                                               \
    static void scores_any_##T(const float *qs, const void *kv, int64_t stride, int64_t g, int64_t D,      \
                               int64_t t0, int64_t t1, float *s, int64_t bs) {                              \
        const ET *kt0 = (const ET *)kv;                                                                     \
        for (int64_t r = 0; r < g; r++)                                                                     \
            for (int64_t t = t0; t < t1; t++) {                                                             \
                const ET *kt = kt0 + t * stride;                                                            \
                const float *qr = qs + r * D;                                                               \
                float dot = 0.0f;                                                                           \
                _Pragma("omp simd reduction(+ : dot)")                                                      \
                for (int64_t d = 0; d < D; d++) dot += qr[d] * load1_##T(kt + d);                           \
                s[r * bs + t] = dot;                                                                        \
            }                                                                                               \
    }                                                                                                       \
    static void values_any_##T(float *acc, const void *vv, int64_t stride, int64_t g, int64_t D, int64_t t0, \
                               int64_t t1, const float *s, int64_t bs) {                                    \
        const ET *vt0 = (const ET *)vv;                                                                     \
        for (int64_t r = 0; r < g; r++)                                                                     \
            for (int64_t t = t0; t < t1; t++) {                                                             \
                const float w = s[r * bs + t];                                                              \
                const ET *vt = vt0 + t * stride;                                                            \
                float *ar = acc + r * D;                                                                    \
                _Pragma("omp simd")                                                                         \
                for (int64_t d = 0; d < D; d++) ar[d] += w * load1_##T(vt + d);                             \
            }                                                                                               \
    }

GENERIC_PASSES(f32, float)
GENERIC_PASSES(bf16, uint16_t)
GENERIC_PASSES(f16, _Float16)

/* The sums of four 8-lane vectors, as lanes 0-3 of one 4-lane vector (a transposed horizontal add). */
typedef float v4 __attribute__((vector_size(16)));
static inline v4 hsum4(v8 a, v8 b, v8 c, v8 d) {
    v8 ab = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
            __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
    v8 cd = __builtin_shufflevector(c, d, 0, 8, 2, 10, 4, 12, 6, 14) +
            __builtin_shufflevector(c, d, 1, 9, 3, 11, 5, 13, 7, 15);
    /* ab = [a01 b01 a23 b23 a45 b45 a67 b67], cd likewise */
    v8 x = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
    /* x = [a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7] */
    return __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
}

#define VECTOR_PASSES(NV, T, ET)                                                                                   \
    static void scores_##NV##_##T(const float *qs, const void *kv, int64_t stride, int64_t g, int64_t D, \
                            int64_t t0, int64_t t1, float *s, int64_t bs) {                                 \
        const ET *kt0 = (const ET *)kv;                                                                     \
        (void)D;                                                                                            \
        for (int64_t r = 0; r < g; r++) {                                                                   \
            v8 qv[NV];                                                                                      \
            for (int n = 0; n < NV; n++) qv[n] = *(const v8 *)(qs + r * 8 * NV + 8 * n);                    \
            int64_t t = t0;                                                                                 \
            for (; t + 4 <= t1; t += 4) { /* four tokens at once: one transposed sum for four dots */       \
                const ET *k0 = kt0 + t * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;    \
                /* two accumulators per token: chains of NV/2 dependent FMAs instead of NV */               \
                v8 a = {0}, b = {0}, c = {0}, d = {0}, a2 = {0}, b2 = {0}, c2 = {0}, d2 = {0};              \
                for (int n = 0; n + 1 < NV; n += 2) {                                                       \
                    a += qv[n] * load8_##T(k0 + 8 * n);                                                 \
                    b += qv[n] * load8_##T(k1 + 8 * n);                                                 \
                    c += qv[n] * load8_##T(k2 + 8 * n);                                                 \
                    d += qv[n] * load8_##T(k3 + 8 * n);                                                 \
                    a2 += qv[n + 1] * load8_##T(k0 + 8 * n + 8);                                        \
                    b2 += qv[n + 1] * load8_##T(k1 + 8 * n + 8);                                        \
                    c2 += qv[n + 1] * load8_##T(k2 + 8 * n + 8);                                        \
                    d2 += qv[n + 1] * load8_##T(k3 + 8 * n + 8);                                        \
                }                                                                                           \
                if (NV % 2) {                                                                               \
                    a += qv[NV - 1] * load8_##T(k0 + 8 * (NV - 1));                                     \
                    b += qv[NV - 1] * load8_##T(k1 + 8 * (NV - 1));                                     \
                    c += qv[NV - 1] * load8_##T(k2 + 8 * (NV - 1));                                     \
                    d += qv[NV - 1] * load8_##T(k3 + 8 * (NV - 1));                                     \
                }                                                                                           \
                v4 sum = hsum4(a + a2, b + b2, c + c2, d + d2);                                             \
                memcpy(s + r * bs + t, &sum, sizeof sum);                                                   \
            }                                                                                               \
            for (; t < t1; t++) {                                                                           \
                const ET *kt = kt0 + t * stride;                                                            \
                v8 a = {0};                                                                                 \
                for (int n = 0; n < NV; n++) a += qv[n] * load8_##T(kt + 8 * n);                        \
                s[r * bs + t] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));          \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    static void values_##NV##_##T(float *acc, const void *vv, int64_t stride, int64_t g, int64_t D,     \
                            int64_t t0, int64_t t1, const float *s, int64_t bs) {                           \
        const ET *vt0 = (const ET *)vv;                                                                     \
        (void)D;                                                                                            \
        for (int64_t r = 0; r < g; r++) {                                                                   \
            v8 av[NV];                                                                                      \
            float *ar = acc + r * 8 * NV;                                                                   \
            for (int n = 0; n < NV; n++) av[n] = *(v8 *)(ar + 8 * n);                                       \
            for (int64_t t = t0; t < t1; t++) {                                                             \
                const float w = s[r * bs + t];                              \
                const ET *vt = vt0 + t * stride;                                      \
                for (int n = 0; n < NV; n++) av[n] += w * load8_##T(vt + 8 * n);                             \
            }                                                                                               \
            for (int n = 0; n < NV; n++) *(v8 *)(ar + 8 * n) = av[n];                                       \
        }                                                                                                   \
    }

#define ALL_WIDTHS(T, ET) \
    VECTOR_PASSES(4, T, ET) VECTOR_PASSES(8, T, ET) VECTOR_PASSES(10, T, ET) VECTOR_PASSES(12, T, ET) VECTOR_PASSES(16, T, ET)
ALL_WIDTHS(f32, float)
ALL_WIDTHS(bf16, uint16_t)
ALL_WIDTHS(f16, _Float16)

typedef void (*scores_fn)(const float *, const void *, int64_t, int64_t, int64_t, int64_t, int64_t, float *, int64_t);
typedef void (*values_fn)(float *, const void *, int64_t, int64_t, int64_t, int64_t, int64_t, const float *, int64_t);

#define PICK(T)                                                                                             \
    do {                                                                                                    \
        *sc = scores_any_##T;                                                                               \
        *va = values_any_##T;                                                                               \
        switch (D) {                                                                                        \
        case 32: *sc = scores_4_##T; *va = values_4_##T; break;                                             \
        case 64: *sc = scores_8_##T; *va = values_8_##T; break;                                             \
        case 80: *sc = scores_10_##T; *va = values_10_##T; break;                                           \
        case 96: *sc = scores_12_##T; *va = values_12_##T; break;                                           \
        case 128: *sc = scores_16_##T; *va = values_16_##T; break;                                          \
        }                                                                                                   \
    } while (0)

/* dtype: 0 float32, 1 bfloat16, 2 float16 (the cache's element type; q, out and lse are float32). */
static void pick_passes(int64_t D, int dtype, scores_fn *sc, values_fn *va) {
    if (dtype == 1) PICK(bf16);
    else if (dtype == 2) PICK(f16);
    else PICK(f32);
}

/* Request rows*len bytes at p, p + stride, ... (one kv head's slice of every token of a block). */
static inline void prefetch_rows(const char *p, int64_t rows, int64_t stride, int64_t len) {
    for (int64_t t = 0; t < rows; t++)
        for (int64_t off = 0; off < len; off += 64) __builtin_prefetch(p + t * stride + off, 0, 3);
}

typedef struct {
    const float *q, *slopes;
    const char *kc, *vc; /* the pools, elements of esize bytes (dtype) */
    const int32_t *table;
    const int64_t *lens, *starts;
    int64_t B, H, Hkv, D, bs, table_width, nsplit, blocks_per_split, esize;
    int dtype;
    float scale, softcap;
    float *part_acc, *part_m, *part_l; /* (B, H, nsplit, D), (B, H, nsplit) x 2 */
    int64_t n_items;
    int failed;   /* set by an item whose scratch allocation failed */
} job_t;

/* One item: sequence b, every head, blocks [j0, j1) of its visible range. A block's keys for all kv heads
 * are one contiguous run of bs * Hkv * D floats, read front to back (hardware prefetch works on it; reading
 * one head's 256-byte rows at a stride is latency-bound), and the next block is prefetched in software
 * since its place in the pool is random. */
static void run_item(const job_t *J, int64_t item) {
    const int64_t D = J->D, bs = J->bs, Hkv = J->Hkv, H = J->H, g = H / Hkv;
    const int64_t split = item % J->nsplit, b = item / J->nsplit;
    const int64_t start = J->starts[b], len = J->lens[b];
    float (*qs)[D] = malloc(sizeof(float[H][D])), (*acc)[D] = malloc(sizeof(float[H][D]));
    float (*s)[bs] = malloc(sizeof(float[H][bs]));
    float *m = malloc(sizeof(float[H])), *l = malloc(sizeof(float[H])), *slope = malloc(sizeof(float[H]));
    if (!qs || !acc || !s || !m || !l || !slope) { __atomic_store_n(&((job_t *)J)->failed, 1, __ATOMIC_RELAXED); goto out; }
    for (int64_t r = 0; r < H; r++) {
        const float *qr = J->q + (b * H + r) * D;
        for (int64_t d = 0; d < D; d++) { qs[r][d] = qr[d] * J->scale; acc[r][d] = 0.0f; }
        m[r] = -INFINITY;
        l[r] = 0.0f;
        slope[r] = J->slopes ? J->slopes[b * H + r] : 0.0f;
    }
    const int64_t first = start / bs, end = (len + bs - 1) / bs;
    const int64_t j0 = first + split * J->blocks_per_split;
    const int64_t j1 = j0 + J->blocks_per_split < end ? j0 + J->blocks_per_split : end;
    const int64_t block_bytes = bs * Hkv * D * J->esize;
    const float softcap = J->softcap;
    scores_fn scores;
    values_fn values;
    pick_passes(D, J->dtype, &scores, &values);
    for (int64_t j = j0; j < j1; j++) {
        const int64_t p = J->table[b * J->table_width + j];
        /* the block PREFETCH ahead: a kv head's slice of it is requested while that head's slice of this
         * block is computed, so its loads are in flight, spread evenly, while this one computes */
        const char *kn = NULL, *vn = NULL;
        if (PREFETCH && j + PREFETCH < j1) {
            const int64_t pn = J->table[b * J->table_width + j + PREFETCH];
            kn = J->kc + pn * block_bytes;
            vn = J->vc + pn * block_bytes;
        }
        const int64_t row_bytes = Hkv * D * J->esize, head_bytes = D * J->esize;
        int64_t t0 = start - j * bs, t1 = len - j * bs;
        if (t0 < 0) t0 = 0;
        if (t1 > bs) t1 = bs;
        if (t0 >= t1) continue;
        const char *kb = J->kc + p * block_bytes, *vb = J->vc + p * block_bytes;
        for (int64_t kh = 0; kh < Hkv; kh++) {
            if (kn) prefetch_rows(kn + kh * head_bytes, bs, row_bytes, head_bytes);
            scores(qs[kh * g], kb + kh * head_bytes, Hkv * D, g, D, t0, t1, s[kh * g], bs);
        }
        for (int64_t r = 0; r < H; r++) {
            float bm = -INFINITY;
            if (softcap > 0.0f)
                for (int64_t t = t0; t < t1; t++) s[r][t] = softcap * tanhf(s[r][t] / softcap);
            if (J->slopes)
                for (int64_t t = t0; t < t1; t++) s[r][t] -= slope[r] * (float)(len - 1 - (j * bs + t));
#pragma omp simd reduction(max : bm)
            for (int64_t t = t0; t < t1; t++) bm = s[r][t] > bm ? s[r][t] : bm;
            const float nm = bm > m[r] ? bm : m[r];
            if (nm > m[r] && l[r] > 0.0f) {  /* rescale what came before to the new max */
                const float c = exp_nonpos(m[r] - nm);
                l[r] *= c;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) acc[r][d] *= c;
            }
            m[r] = nm;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = t0; t < t1; t++) { const float e = exp_nonpos(s[r][t] - nm); s[r][t] = e; sum += e; }
            l[r] += sum;
        }
        for (int64_t kh = 0; kh < Hkv; kh++) {
            if (vn) prefetch_rows(vn + kh * head_bytes, bs, row_bytes, head_bytes);
            values(acc[kh * g], vb + kh * head_bytes, Hkv * D, g, D, t0, t1, s[kh * g], bs);
        }
    }
    for (int64_t r = 0; r < H; r++) {
        const int64_t row = (b * H + r) * J->nsplit + split;
        memcpy(J->part_acc + row * D, acc[r], (size_t)D * sizeof(float));
        J->part_m[row] = m[r];
        J->part_l[row] = l[r];
    }
out:
    free(qs); free(acc); free(s); free(m); free(l); free(slope);
}

static void item_fn(void *J, int64_t item) { run_item((const job_t *)J, item); }

/* Merge the nsplit partial results of every (sequence, head) into out and lse. */
static void merge_splits(const job_t *J, float *out, float *lse) {
    const int64_t D = J->D, ns = J->nsplit;
    for (int64_t row = 0; row < J->B * J->H; row++) {
        float mx = -INFINITY, total = 0.0f;
        for (int64_t k = 0; k < ns; k++) {
            float mk = J->part_m[row * ns + k];
            if (J->part_l[row * ns + k] > 0.0f && mk > mx) mx = mk;
        }
        float *o = out + row * D;
        memset(o, 0, (size_t)D * sizeof(float));
        for (int64_t k = 0; k < ns; k++) {
            float lk = J->part_l[row * ns + k];
            if (!(lk > 0.0f)) continue;
            float w = exp_nonpos(J->part_m[row * ns + k] - mx);
            total += w * lk;
            const float *a = J->part_acc + (row * ns + k) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) o[d] += w * a[d];
        }
        if (total > 0.0f) {
            float inv = 1.0f / total;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
            lse[row] = mx + logf(total);
        } else {
            lse[row] = -INFINITY;
        }
    }
}

/* dtype: the pools' element type (0 float32, 1 bfloat16, 2 float16). Returns 0 on success, 1 for bad sizes or
 * dtype, 2 when scratch memory could not be allocated. */
int paged_decode(int dtype, const float *q, const void *kc, const void *vc, const int32_t *table, int64_t table_width,
                     const int64_t *lens, const int64_t *starts, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                     int64_t bs, float scale, float softcap, const float *slopes, int64_t nsplit,
                     int64_t blocks_per_split, float *out, float *lse, int nthreads) {
    if (Hkv <= 0 || H % Hkv || nsplit < 1 || dtype < 0 || dtype > 2) return 1;
    job_t J = {q, slopes, (const char *)kc, (const char *)vc, table, lens, starts, B, H, Hkv, D, bs, table_width,
               nsplit, blocks_per_split, dtype == 0 ? 4 : 2, dtype, scale, softcap, NULL, NULL, NULL, B * nsplit, 0};
    J.part_acc = (float *)malloc((size_t)(B * H * nsplit * D) * sizeof(float) + 1);
    J.part_m = (float *)malloc((size_t)(B * H * nsplit) * sizeof(float) + 1);
    J.part_l = (float *)malloc((size_t)(B * H * nsplit) * sizeof(float) + 1);
    int rc = 0;
    if (!J.part_acc || !J.part_m || !J.part_l) { rc = 2; goto done; }
    parallel_for(item_fn, &J, J.n_items, nthreads);  /* pool.c's persistent threads */
    if (J.failed) { rc = 2; goto done; }
    merge_splits(&J, out, lse);
done:
    free(J.part_acc);
    free(J.part_m);
    free(J.part_l);
    return rc;
}
