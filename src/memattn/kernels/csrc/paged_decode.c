/* Paged decode attention on the CPU (float32, bfloat16 or float16 caches, float32 arithmetic): one query per
 * sequence, keys and values read in place
 * through the block table (no gather copy), online softmax per block, one pass over the KV bytes.
 *
 * Built on first use by memattn/kernels/native.py (cc -O3 -march=native -fopenmp-simd -pthread) and
 * called through ctypes; no Python or torch headers, so it compiles in about a second.
 *
 * Layouts (all contiguous, row-major):
 *   q      (B, H, D)             query of each sequence
 *   kc, vc (N, bs, Hkv, D)       the block pool, float32 / bfloat16 / float16, or quantized codes (below)
 *   table  (B, table_width)      int32 physical block ids
 *   lens   (B,) int64            visible keys of sequence b are [starts[b], lens[b])
 *   slopes (B, H) or NULL        ALiBi: score += -slope * (lens[b] - 1 - j)
 *   out    (B, H, D), lse (B, H) float32; a sequence that sees no key gets out 0, lse -inf
 * Query head h reads kv head h / (H / Hkv).
 *
 * Quantized pools (memattn/cache/kv_formats.py) are read in place, each code widened to float32 in registers
 * as it is loaded; the scales never touch the codes' arithmetic, they scale whole dot products and weights:
 *   int8 / fp8 e4m3: codes (N, bs, Hkv, D), float32 scales ks, vs (N, bs, Hkv): k = code * ks[token, head], so
 *     score = (q . code) * ks, and a value row enters the accumulator with weight p * vs.
 *   KIVI int4 / int2: codes packed 2 / 4 per byte (N, bs, Hkv, D / P); keys per channel, float16 ks, kz
 *     (N, Hkv, D): q . k = (q * ks) . code + q . kz (the scaled query made once per block and head); values per
 *     token, float16 vs, vz (N, bs, Hkv): sum_t p_t v_t = sum_t (p_t vs_t) code_t + sum_t p_t vz_t.
 *     Block p is held at full precision in the float32 residual pools rk, rv (R, bs, Hkv, D) at slot
 *     rmap[p] while rmap[p] >= 0 (a sequence's last, partial block: KIVI's residual window).
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
/* Tokens of a block scored (and accumulated) for every kv head before the next ones. Smaller chunks stream a
 * block front to back instead of one head's rows at a stride, but measured slower on an AMD EPYC (4: 0.7x of
 * 16) once the next block is prefetched into L2; 16 = a whole default block per head. */
#ifndef TOKEN_CHUNK
#define TOKEN_CHUNK 16
#endif

/* exp(x) for x <= 0 (scores minus their running max), vectorisable: 2^n * p(r), |r| <= ln2/2,
 * degree-7 Taylor polynomial (relative error ~5e-9, below float32's epsilon). -inf and x < -87 give 0. */
static inline float exp_nonpos(float x) {
    if (!(x > -87.0f)) return 0.0f;  /* also catches -inf and NaN */
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    /* round to nearest by the 1.5 * 2^23 trick (|x * log2e| < 2^22 here): roundf is a libm call that
     * keeps the loops around it scalar */
    float n = (x * log2e + 12582912.0f) - 12582912.0f;
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

/* Eight or one cache elements as float32: float32 as is, bfloat16 by a 16-bit shift, float16 by conversion,
 * int8 by conversion, fp8 e4m3 through float16, KIVI's packed codes by shifts and masks. IDX_T(i) is the offset,
 * in stored elements of type T, of element i (packed types hold 2 or 4 codes per byte; vector loads start at
 * multiples of 8). */
#define IDX_f32(i) (i)
#define IDX_bf16(i) (i)
#define IDX_f16(i) (i)
#define IDX_i8(i) (i)
#define IDX_e4m3(i) (i)
#define IDX_u4(i) ((i) >> 1)
#define IDX_u2(i) ((i) >> 2)
typedef int8_t i8x8 __attribute__((vector_size(8), aligned(1)));
typedef uint8_t u8x8 __attribute__((vector_size(8), aligned(1)));
typedef uint8_t u8x4 __attribute__((vector_size(4), aligned(1)));
typedef uint8_t u8x2 __attribute__((vector_size(2), aligned(1)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
/* The fp8 e4m3 bit pattern moved into float16's (sign, exponent, mantissa) places is its value / 256
 * (exponent bias 15 instead of 7; subnormals map to subnormals). The 256 is folded into the scale. */
#define E4M3_UNIT 256.0f

static inline v8 load8_f32(const float *p) { return *(const v8 *)p; }
static inline v8 load8_bf16(const uint16_t *p) {
    u32x8 w = __builtin_convertvector(*(const u16x8 *)p, u32x8) << 16;
    v8 r;
    memcpy(&r, &w, sizeof r);
    return r;
}
static inline v8 load8_f16(const _Float16 *p) { return __builtin_convertvector(*(const h8 *)p, v8); }
#if defined(__AVX2__) && defined(__F16C__)
/* GCC 12 turns the narrow-integer vector conversions below into one scalar conversion per lane: intrinsics */
#include <immintrin.h>
static inline v8 load8_i8(const int8_t *p) {
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline v8 load8_e4m3(const uint8_t *p) {
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    __m128i bits = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7),
                                _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
    return (v8)_mm256_cvtph_ps(bits);
}
static inline v8 load_packed8(const uint8_t *p, int nbytes, __m128i spread, __m256i shifts, int mask) {
    int32_t word = 0;
    memcpy(&word, p, (size_t)nbytes);
    __m256i w = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(word), spread));
    return (v8)_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32(mask)));
}
static inline v8 load8_u4(const uint8_t *p) {
    return load_packed8(p, 4, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0),
                        _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4), 15);
}
static inline v8 load8_u2(const uint8_t *p) {
    return load_packed8(p, 2, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                        _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6), 3);
}
#else
static inline v8 load8_i8(const int8_t *p) { return __builtin_convertvector(*(const i8x8 *)p, v8); }
static inline v8 load8_e4m3(const uint8_t *p) {
    u16x8 b = __builtin_convertvector(*(const u8x8 *)p, u16x8);
    u16x8 bits = ((b & 0x7F) << 7) | ((b & 0x80) << 8);
    h8 h;
    memcpy(&h, &bits, sizeof h);
    return __builtin_convertvector(h, v8);
}
static inline v8 load8_u4(const uint8_t *p) {
    u8x4 b = *(const u8x4 *)p;
    i32x8 w = __builtin_convertvector(__builtin_shufflevector(b, b, 0, 0, 1, 1, 2, 2, 3, 3), i32x8);
    w = (w >> (i32x8){0, 4, 0, 4, 0, 4, 0, 4}) & 15;
    return __builtin_convertvector(w, v8);
}
static inline v8 load8_u2(const uint8_t *p) {
    u8x2 b = *(const u8x2 *)p;
    i32x8 w = __builtin_convertvector(__builtin_shufflevector(b, b, 0, 0, 0, 0, 1, 1, 1, 1), i32x8);
    w = (w >> (i32x8){0, 2, 4, 6, 0, 2, 4, 6}) & 3;
    return __builtin_convertvector(w, v8);
}
#endif
static inline float load1_f32(const float *p, int64_t i) { return p[i]; }
static inline float load1_bf16(const uint16_t *p, int64_t i) {
    uint32_t w = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}
static inline float load1_f16(const _Float16 *p, int64_t i) { return (float)p[i]; }
static inline float load1_i8(const int8_t *p, int64_t i) { return (float)p[i]; }
static inline float load1_e4m3(const uint8_t *p, int64_t i) {
    uint16_t b = p[i], bits = (uint16_t)(((b & 0x7F) << 7) | ((b & 0x80) << 8));
    _Float16 h;
    memcpy(&h, &bits, sizeof h);
    return (float)h;
}
static inline float load1_u4(const uint8_t *p, int64_t i) { return (float)((p[i >> 1] >> ((i & 1) * 4)) & 15); }
static inline float load1_u2(const uint8_t *p, int64_t i) { return (float)((p[i >> 2] >> ((i & 3) * 2)) & 3); }

#define GENERIC_PASSES(T, ET)                                                                               \
    static void scores_any_##T(const float *qs, const void *kv, int64_t stride, int64_t g, int64_t D,      \
                               int64_t t0, int64_t t1, float *s, int64_t bs) {                              \
        const ET *kt0 = (const ET *)kv;                                                                     \
        for (int64_t r = 0; r < g; r++)                                                                     \
            for (int64_t t = t0; t < t1; t++) {                                                             \
                const ET *kt = kt0 + IDX_##T(t * stride);                                                   \
                const float *qr = qs + r * D;                                                               \
                float dot = 0.0f;                                                                           \
                _Pragma("omp simd reduction(+ : dot)")                                                      \
                for (int64_t d = 0; d < D; d++) dot += qr[d] * load1_##T(kt, d);                            \
                s[r * bs + t] = dot;                                                                        \
            }                                                                                               \
    }                                                                                                       \
    static void values_any_##T(float *acc, const void *vv, int64_t stride, int64_t g, int64_t D, int64_t t0, \
                               int64_t t1, const float *s, int64_t bs) {                                    \
        const ET *vt0 = (const ET *)vv;                                                                     \
        for (int64_t r = 0; r < g; r++)                                                                     \
            for (int64_t t = t0; t < t1; t++) {                                                             \
                const float w = s[r * bs + t];                                                              \
                const ET *vt = vt0 + IDX_##T(t * stride);                                                   \
                float *ar = acc + r * D;                                                                    \
                _Pragma("omp simd")                                                                         \
                for (int64_t d = 0; d < D; d++) ar[d] += w * load1_##T(vt, d);                              \
            }                                                                                               \
    }

GENERIC_PASSES(f32, float)
GENERIC_PASSES(bf16, uint16_t)
GENERIC_PASSES(f16, _Float16)
GENERIC_PASSES(i8, int8_t)
GENERIC_PASSES(e4m3, uint8_t)
GENERIC_PASSES(u4, uint8_t)
GENERIC_PASSES(u2, uint8_t)

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
                const ET *k0 = kt0 + IDX_##T(t * stride), *k1 = k0 + IDX_##T(stride);                       \
                const ET *k2 = k1 + IDX_##T(stride), *k3 = k2 + IDX_##T(stride);                            \
                /* two accumulators per token: chains of NV/2 dependent FMAs instead of NV */               \
                v8 a = {0}, b = {0}, c = {0}, d = {0}, a2 = {0}, b2 = {0}, c2 = {0}, d2 = {0};              \
                for (int n = 0; n + 1 < NV; n += 2) {                                                       \
                    a += qv[n] * load8_##T(k0 + IDX_##T(8 * n));                                                 \
                    b += qv[n] * load8_##T(k1 + IDX_##T(8 * n));                                                 \
                    c += qv[n] * load8_##T(k2 + IDX_##T(8 * n));                                                 \
                    d += qv[n] * load8_##T(k3 + IDX_##T(8 * n));                                                 \
                    a2 += qv[n + 1] * load8_##T(k0 + IDX_##T(8 * n + 8));                                        \
                    b2 += qv[n + 1] * load8_##T(k1 + IDX_##T(8 * n + 8));                                        \
                    c2 += qv[n + 1] * load8_##T(k2 + IDX_##T(8 * n + 8));                                        \
                    d2 += qv[n + 1] * load8_##T(k3 + IDX_##T(8 * n + 8));                                        \
                }                                                                                           \
                if (NV % 2) {                                                                               \
                    a += qv[NV - 1] * load8_##T(k0 + IDX_##T(8 * (NV - 1)));                                     \
                    b += qv[NV - 1] * load8_##T(k1 + IDX_##T(8 * (NV - 1)));                                     \
                    c += qv[NV - 1] * load8_##T(k2 + IDX_##T(8 * (NV - 1)));                                     \
                    d += qv[NV - 1] * load8_##T(k3 + IDX_##T(8 * (NV - 1)));                                     \
                }                                                                                           \
                v4 sum = hsum4(a + a2, b + b2, c + c2, d + d2);                                             \
                memcpy(s + r * bs + t, &sum, sizeof sum);                                                   \
            }                                                                                               \
            for (; t < t1; t++) {                                                                           \
                const ET *kt = kt0 + IDX_##T(t * stride);                                                            \
                v8 a = {0};                                                                                 \
                for (int n = 0; n < NV; n++) a += qv[n] * load8_##T(kt + IDX_##T(8 * n));                        \
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
                const ET *vt = vt0 + IDX_##T(t * stride);                                     \
                for (int n = 0; n < NV; n++) av[n] += w * load8_##T(vt + IDX_##T(8 * n));                             \
            }                                                                                               \
            for (int n = 0; n < NV; n++) *(v8 *)(ar + 8 * n) = av[n];                                       \
        }                                                                                                   \
    }

#define ALL_WIDTHS(T, ET) \
    VECTOR_PASSES(4, T, ET) VECTOR_PASSES(8, T, ET) VECTOR_PASSES(10, T, ET) VECTOR_PASSES(12, T, ET) VECTOR_PASSES(16, T, ET)
ALL_WIDTHS(f32, float)
ALL_WIDTHS(bf16, uint16_t)
ALL_WIDTHS(f16, _Float16)
ALL_WIDTHS(i8, int8_t)
ALL_WIDTHS(e4m3, uint8_t)
ALL_WIDTHS(u4, uint8_t)
ALL_WIDTHS(u2, uint8_t)

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

/* dtype: the cache's element type (q, out and lse are float32): 0 float32, 1 bfloat16, 2 float16, 3 int8,
 * 4 fp8 e4m3, 5 KIVI 4-bit, 6 KIVI 2-bit codes. */
enum { DT_F32, DT_BF16, DT_F16, DT_I8, DT_E4M3, DT_U4, DT_U2, DT_COUNT };
static const int DT_BITS[DT_COUNT] = {32, 16, 16, 8, 8, 4, 2};
static void pick_passes(int64_t D, int dtype, scores_fn *sc, values_fn *va) {
    switch (dtype) {
    case DT_BF16: PICK(bf16); break;
    case DT_F16: PICK(f16); break;
    case DT_I8: PICK(i8); break;
    case DT_E4M3: PICK(e4m3); break;
    case DT_U4: PICK(u4); break;
    case DT_U2: PICK(u2); break;
    default: PICK(f32);
    }
}

/* Request rows*len bytes at p, p + stride, ... (one kv head's slice of every token of a block) into L2, not L1:
 * the next block brought into L1 would evict the one being read (measured 0.68x -> 0.87x of SDPA on an EPYC). */
static inline void prefetch_rows(const char *p, int64_t rows, int64_t stride, int64_t len) {
    for (int64_t t = 0; t < rows; t++)
        for (int64_t off = 0; off < len; off += 64) __builtin_prefetch(p + t * stride + off, 0, 1); /* to L2 */
}

static inline void prefetch_bytes(const void *p, int64_t len) {
    for (int64_t off = 0; off < len; off += 64) __builtin_prefetch((const char *)p + off, 0, 3);
}

typedef struct {
    const float *q, *slopes;
    const char *kc, *vc; /* the pools, elements of DT_BITS[dtype] bits */
    const void *ks, *kz, *vs, *vz; /* quantized pools: scales (and KIVI zero points), NULL otherwise */
    const float *rk, *rv;          /* KIVI: full-precision residual blocks, rmap[p] their slot or -1 */
    const int32_t *rmap;
    const int32_t *table;
    const int64_t *lens, *starts;
    int64_t B, H, Hkv, D, bs, table_width, nsplit, blocks_per_split;
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
    /* KIVI: the query times a block's key scales (per kv head), q . zero point, sum_t p_t * value zero point */
    float (*qk)[D] = malloc(sizeof(float[H][D])), *qz = malloc(sizeof(float[H])), *zb = malloc(sizeof(float[H]));
    if (!qs || !acc || !s || !m || !l || !slope || !qk || !qz || !zb) {
        __atomic_store_n(&((job_t *)J)->failed, 1, __ATOMIC_RELAXED);
        goto out;
    }
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
    const int64_t head_bytes = D * DT_BITS[J->dtype] / 8, row_bytes = Hkv * head_bytes, block_bytes = bs * row_bytes;
    const int64_t res_head = D * 4, res_row = Hkv * res_head, res_block = bs * res_row;
    const float softcap = J->softcap;
    const int sym = J->dtype == DT_I8 || J->dtype == DT_E4M3, kivi = J->dtype == DT_U4 || J->dtype == DT_U2;
    const float unit = J->dtype == DT_E4M3 ? E4M3_UNIT : 1.0f;
    scores_fn scores, scores_res;
    values_fn values, values_res;
    pick_passes(D, J->dtype, &scores, &values);
    pick_passes(D, DT_F32, &scores_res, &values_res);
    for (int64_t j = j0; j < j1; j++) {
        const int64_t p = J->table[b * J->table_width + j];
        const int64_t rslot = J->rmap ? J->rmap[p] : -1;
        const int quant = (sym || kivi) && rslot < 0; /* codes to scale; a residual block is plain float32 */
        /* the block PREFETCH ahead: a kv head's slice of it is requested just before that head's slice of
         * this block is scored (keys) or accumulated (values), so its loads are in flight, spread evenly,
         * while this one computes */
        const char *kn = NULL, *vn = NULL;
        if (PREFETCH && j + PREFETCH < j1) {
            const int64_t pn = J->table[b * J->table_width + j + PREFETCH];
            kn = J->kc + pn * block_bytes;
            vn = J->vc + pn * block_bytes;
            /* a quantized block's scales (and zero points) live apart from its codes: a miss of their own */
            if (sym) {
                prefetch_bytes((const float *)J->ks + pn * bs * Hkv, bs * Hkv * 4);
                prefetch_bytes((const float *)J->vs + pn * bs * Hkv, bs * Hkv * 4);
            } else if (kivi) {
                prefetch_bytes((const _Float16 *)J->ks + pn * Hkv * D, Hkv * D * 2);
                prefetch_bytes((const _Float16 *)J->kz + pn * Hkv * D, Hkv * D * 2);
                prefetch_bytes((const _Float16 *)J->vs + pn * bs * Hkv, bs * Hkv * 2);
                prefetch_bytes((const _Float16 *)J->vz + pn * bs * Hkv, bs * Hkv * 2);
                if (J->rmap) __builtin_prefetch(J->rmap + pn, 0, 3);
            }
        }
        int64_t t0 = start - j * bs, t1 = len - j * bs;
        if (t0 < 0) t0 = 0;
        if (t1 > bs) t1 = bs;
        if (t0 >= t1) continue;
        const char *kb = J->kc + p * block_bytes, *vb = J->vc + p * block_bytes;
        int64_t hb = head_bytes;
        scores_fn sc = scores;
        values_fn va = values;
        if (rslot >= 0) {
            kb = (const char *)J->rk + rslot * res_block;
            vb = (const char *)J->rv + rslot * res_block;
            hb = res_head, sc = scores_res, va = values_res;
        }
        for (int64_t kh = 0; kh < Hkv; kh++) {
            if (quant && kivi) { /* q . (code * ks + kz) = (q * ks) . code + q . kz, per channel */
                const _Float16 *ks = (const _Float16 *)J->ks + (p * Hkv + kh) * D;
                const _Float16 *kz = (const _Float16 *)J->kz + (p * Hkv + kh) * D;
                for (int64_t r = kh * g; r < (kh + 1) * g; r++) {
                    float z = 0.0f;
#pragma omp simd reduction(+ : z)
                    for (int64_t d = 0; d < D; d++) { qk[r][d] = qs[r][d] * (float)ks[d]; z += qs[r][d] * (float)kz[d]; }
                    qz[r] = z;
                }
            }
        }
        const float(*qh)[D] = quant && kivi ? (const float(*)[D])qk : (const float(*)[D])qs;
        /* TOKEN_CHUNK tokens of every head at a time: the block is read front to back, row after row */
        for (int64_t ta = t0; ta < t1; ta += TOKEN_CHUNK) {
            const int64_t tb = ta + TOKEN_CHUNK < t1 ? ta + TOKEN_CHUNK : t1;
            for (int64_t kh = 0; kh < Hkv; kh++) {
                /* kv head kh's slice of the next block, requested just before kh's slice of this one is
                 * scored: the loads stay spread over the block's work (one burst for all heads queued
                 * behind each other; measured ~10% slower on the EPYC at 32 x 4096, fp32) */
                if (kn && ta == t0) prefetch_rows(kn + kh * head_bytes, bs, row_bytes, head_bytes);
                sc(qh[kh * g], kb + kh * hb, Hkv * D, g, D, ta, tb, s[kh * g], bs);
            }
        }
        if (quant)
            for (int64_t kh = 0; kh < Hkv; kh++)
                for (int64_t r = kh * g; r < (kh + 1) * g; r++) {
                    if (sym) {
                        const float *ks = (const float *)J->ks + p * bs * Hkv + kh;
                        for (int64_t t = t0; t < t1; t++) s[r][t] *= ks[t * Hkv] * unit;
                    } else {
                        for (int64_t t = t0; t < t1; t++) s[r][t] += qz[r];
                    }
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
            if (quant) /* the weights become p_t * scale_t (KIVI: the zero points' share summed aside) */
                for (int64_t r = kh * g; r < (kh + 1) * g; r++) {
                    if (sym) {
                        const float *vs = (const float *)J->vs + p * bs * Hkv + kh;
                        for (int64_t t = t0; t < t1; t++) s[r][t] *= vs[t * Hkv] * unit;
                    } else {
                        const _Float16 *vs = (const _Float16 *)J->vs + p * bs * Hkv + kh;
                        const _Float16 *vz = (const _Float16 *)J->vz + p * bs * Hkv + kh;
                        float z = 0.0f;
                        for (int64_t t = t0; t < t1; t++) { z += s[r][t] * (float)vz[t * Hkv]; s[r][t] *= (float)vs[t * Hkv]; }
                        zb[r] = z;
                    }
                }
        }
        for (int64_t ta = t0; ta < t1; ta += TOKEN_CHUNK) {
            const int64_t tb = ta + TOKEN_CHUNK < t1 ? ta + TOKEN_CHUNK : t1;
            for (int64_t kh = 0; kh < Hkv; kh++) {
                if (vn && ta == t0) prefetch_rows(vn + kh * head_bytes, bs, row_bytes, head_bytes); /* as for k */
                va(acc[kh * g], vb + kh * hb, Hkv * D, g, D, ta, tb, s[kh * g], bs);
            }
        }
        if (quant && kivi)
            for (int64_t r = 0; r < H; r++) {
#pragma omp simd
                for (int64_t d = 0; d < D; d++) acc[r][d] += zb[r];
            }
    }
    for (int64_t r = 0; r < H; r++) {
        const int64_t row = (b * H + r) * J->nsplit + split;
        memcpy(J->part_acc + row * D, acc[r], (size_t)D * sizeof(float));
        J->part_m[row] = m[r];
        J->part_l[row] = l[r];
    }
out:
    free(qs); free(acc); free(s); free(m); free(l); free(slope); free(qk); free(qz); free(zb);
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

/* dtype: the pools' element type (DT_*). ks, kz, vs, vz: a quantized pool's scales and zero points (see the
 * top of this file), rk, rv, rmap: KIVI's residual blocks; NULL for a full-width pool. Returns 0 on success,
 * 1 for bad sizes or dtype, 2 when scratch memory could not be allocated. */
int paged_decode_quant(int dtype, const float *q, const void *kc, const void *vc, const void *ks, const void *kz,
                       const void *vs, const void *vz, const float *rk, const float *rv, const int32_t *rmap,
                       const int32_t *table, int64_t table_width, const int64_t *lens, const int64_t *starts,
                       int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale, float softcap,
                       const float *slopes, int64_t nsplit, int64_t blocks_per_split, float *out, float *lse,
                       int nthreads) {
    if (Hkv <= 0 || H % Hkv || nsplit < 1 || dtype < 0 || dtype >= DT_COUNT || (D * DT_BITS[dtype]) % 8) return 1;
    if (dtype >= DT_I8 && (!ks || !vs || (dtype >= DT_U4 && (!kz || !vz)))) return 1;
    job_t J = {q, slopes, (const char *)kc, (const char *)vc, ks, kz, vs, vz, rk, rv, rmap, table, lens, starts,
               B, H, Hkv, D, bs, table_width, nsplit, blocks_per_split, dtype, scale, softcap, NULL, NULL, NULL,
               B * nsplit, 0};
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

/* A full-width pool (dtype 0 float32, 1 bfloat16, 2 float16): ``paged_decode_quant`` without scales. */
int paged_decode(int dtype, const float *q, const void *kc, const void *vc, const int32_t *table, int64_t table_width,
                 const int64_t *lens, const int64_t *starts, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                 int64_t bs, float scale, float softcap, const float *slopes, int64_t nsplit,
                 int64_t blocks_per_split, float *out, float *lse, int nthreads) {
    if (dtype < 0 || dtype > DT_F16) return 1;
    return paged_decode_quant(dtype, q, kc, vc, NULL, NULL, NULL, NULL, NULL, NULL, NULL, table, table_width, lens,
                              starts, B, H, Hkv, D, bs, scale, softcap, slopes, nsplit, blocks_per_split, out, lse,
                              nthreads);
}
