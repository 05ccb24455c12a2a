/* Matrix-vector products for batch-1 (and few-row) decode on the CPU: y (M, N) = x (M, K) @ w (N, K)^T + bias,
 * w row-major as nn.Linear stores it (float32, bfloat16 or float16), float32 arithmetic, y rounded to x's dtype.
 *
 * A decode step with few rows is bound by reading the weights once. Each thread takes a contiguous run of
 * rows of w and streams it front to back, one row at a time (which the prefetchers follow best), dot products
 * against all M rows of x (kept in L1 as float32). bfloat16 widens by a 16-bit shift, float16 by conversion (F16C): half the bytes of float32 to
 * stream. The threads are pool.c's (persistent; they spin briefly between calls, then sleep).
 *
 * Built on first use by memattn/kernels/native.py (cc -O3 -march=native -pthread) and called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

#define MAX_M 8
#define MAX_THREADS 64

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32), aligned(4)));
typedef _Float16 h8 __attribute__((vector_size(16), aligned(2)));

static inline v8 load8_f32(const void *p) { return *(const v8 *)p; }
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
/* one ymm zero-extension and a shift (the generic vector code below splits the widening in two halves) */
static inline v8 load8_bf16(const void *p) {
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    return (v8)_mm256_castsi256_ps(w);
}
static inline v8 load8_f16(const void *p) { return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#else
static inline v8 load8_bf16(const void *p) {
    u32x8 w = __builtin_convertvector(*(const u16x8 *)p, u32x8) << 16;
    v8 r;
    memcpy(&r, &w, sizeof r);
    return r;
}
static inline v8 load8_f16(const void *p) { return __builtin_convertvector(*(const h8 *)p, v8); }
#endif
static inline float hsum(v8 a) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += a[i];
    return s;
}
/* a[0] + ... + a[u-1] pairwise: (a0 + a1) + (a2 + a3) for four */
static inline v8 combine(const v8 *a, int u) {
    if (u >= 4) return (a[0] + a[1]) + (a[2] + a[3]);
    return u >= 2 ? a[0] + a[1] : a[0];
}

typedef struct {
    int dtype;            /* of w: 0 float32, 1 bfloat16, 2 float16 */
    int out_dtype;        /* of y */
    const float *x;       /* (M, K) float32 */
    const void *w;        /* (N, K) */
    const float *bias;    /* (N,) float32 or NULL */
    void *y;              /* (M, N) */
    int64_t M, N, K;
    int64_t rows_per_part, parts;
} job_t;

/* Rows [n0, n1) of y for MM rows of x (a compile-time constant): one row of w at a time, front to back, so each
 * thread reads its run of w as a single sequential stream, which the hardware prefetchers follow best (several
 * rows of w read side by side are short streams a row apart: measured ~10 GB/s against ~23 for one stream on
 * the 2-core EPYC, 49152 x 576 float32). U accumulators per row of x over k (U * 8 consecutive k per step)
 * hide the FMA latency: MM * U independent sums. No software prefetch: on that EPYC a prefetch 1 KiB ahead cut
 * the one-row stream from ~28 to ~22 GB/s (the hardware prefetchers already run ahead of a plain read). */
#define ROWS(T, LOAD, MM, U)                                                                                 \
    static void rows_##T##_##MM(const job_t *J, int64_t n0, int64_t n1) {                                   \
        const int64_t K = J->K, KU = K & ~(int64_t)(8 * (U) - 1), K8 = K & ~(int64_t)7;                      \
        const size_t es = T == 0 ? 4 : 2;                                                                    \
        const char *w = (const char *)J->w;                                                                  \
        const float *x = J->x;                                                                               \
        for (int64_t n = n0; n < n1; n++) {                                                                  \
            const char *r = w + (size_t)n * K * es;                                                          \
            v8 acc[MM][U];                                                                                   \
            _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++)                                             \
                _Pragma("GCC unroll 8") for (int u = 0; u < U; u++) acc[m][u] = (v8){0};                     \
            int64_t k = 0;                                                                                   \
            for (; k < KU; k += 8 * (U)) {                                                                   \
                _Pragma("GCC unroll 8") for (int u = 0; u < U; u++) {                                        \
                    const v8 wv = LOAD(r + (k + 8 * u) * es);                                                \
                    _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++)                                     \
                        acc[m][u] += wv * *(const v8 *)(x + m * K + k + 8 * u);                              \
                }                                                                                            \
            }                                                                                                \
            for (; k < K8; k += 8) {                                                                         \
                const v8 wv = LOAD(r + k * es);                                                              \
                _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++) acc[m][0] += wv * *(const v8 *)(x + m * K + k); \
            }                                                                                                \
            for (int m = 0; m < MM; m++) {                                                                   \
                float sum = hsum(combine(acc[m], U));                                                        \
                for (int64_t kk = K8; kk < K; kk++) sum += x[m * K + kk] * load1(T, w, n * K + kk);          \
                if (J->bias) sum += J->bias[n];                                                              \
                store1(J->out_dtype, J->y, m * J->N + n, sum);                                               \
            }                                                                                                \
        }                                                                                                    \
    }

#define ALL_M(T, LOAD)                                                                                       \
    ROWS(T, LOAD, 1, 4) ROWS(T, LOAD, 2, 4) ROWS(T, LOAD, 3, 2) ROWS(T, LOAD, 4, 2)                          \
    ROWS(T, LOAD, 5, 2) ROWS(T, LOAD, 6, 1) ROWS(T, LOAD, 7, 1) ROWS(T, LOAD, 8, 1)                          \
    static void rows_##T(const job_t *J, int64_t n0, int64_t n1) {                                           \
        switch (J->M) {                                                                                      \
        case 1: rows_##T##_1(J, n0, n1); break;                                                              \
        case 2: rows_##T##_2(J, n0, n1); break;                                                              \
        case 3: rows_##T##_3(J, n0, n1); break;                                                              \
        case 4: rows_##T##_4(J, n0, n1); break;                                                              \
        case 5: rows_##T##_5(J, n0, n1); break;                                                              \
        case 6: rows_##T##_6(J, n0, n1); break;                                                              \
        case 7: rows_##T##_7(J, n0, n1); break;                                                              \
        default: rows_##T##_8(J, n0, n1); break;                                                             \
        }                                                                                                    \
    }
ALL_M(0, load8_f32)
ALL_M(1, load8_bf16)
ALL_M(2, load8_f16)

static void run_part(const job_t *J, int64_t part);
static void run_part_fn(void *J, int64_t part) { run_part((const job_t *)J, part); }
static void run_part(const job_t *J, int64_t part) {
    int64_t n0 = part * J->rows_per_part, n1 = n0 + J->rows_per_part;
    if (n1 > J->N) n1 = J->N;
    if (n0 >= n1) return;
    if (J->dtype == 0) rows_0(J, n0, n1);
    else if (J->dtype == 1) rows_1(J, n0, n1);
    else rows_2(J, n0, n1);
}

/* dtype / out_dtype: 0 float32, 1 bfloat16, 2 float16. x (M, K) float32 contiguous; w (N, K) contiguous; bias
 * float32 (N,) or NULL; y (M, N) contiguous in out_dtype. Returns 0, or 1 for bad sizes. */
int gemv(int dtype, int out_dtype, const float *x, int64_t M, const void *w, int64_t N, int64_t K,
         const float *bias, void *y, int nthreads) {
    if (M < 1 || M > MAX_M || N < 0 || K < 0 || dtype < 0 || dtype > 2 || out_dtype < 0 || out_dtype > 2) return 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    /* below ~64 KiB of weights one thread is quicker than waking others */
    int64_t bytes = N * K * (dtype == 0 ? 4 : 2);
    if (bytes < (64 << 10) || nthreads < 1) nthreads = 1;
    job_t J = {dtype, out_dtype, x, w, bias, y, M, N, K, N, 1};
    if (nthreads == 1) {
        run_part(&J, 0);
        return 0;
    }
    /* runs of at least 16 KiB of weights and 4 rows, about 4 per thread */
    int64_t row_bytes = K * (dtype == 0 ? 4 : 2), per = (N + 4 * nthreads - 1) / (4 * nthreads);
    if (per * row_bytes < (16 << 10)) per = (16 << 10) / (row_bytes > 0 ? row_bytes : 1) + 1;
    per = (per + 3) & ~(int64_t)3;
    J.rows_per_part = per;
    J.parts = (N + per - 1) / per;
    parallel_for(run_part_fn, &J, J.parts, nthreads);
    return 0;
}

/* ---- the elementwise steps between a decode layer's GEMVs, one call each instead of several torch ops ---- */

/* x (M, D) += delta (M, D) in place (delta NULL: no add), then out (M, D) = rms_norm(x) * weight the way
 * transformers' LlamaRMSNorm computes it: x * rsqrt(mean(x^2) + eps) in float32, rounded to the dtype, then
 * times weight in the dtype (for float32 the roundings are no-ops). All in `dtype` (0 f32, 1 bf16, 2 f16). */
int add_rms_norm(int dtype, void *x, const void *delta, const void *weight, void *out, int64_t M, int64_t D, float eps) {
    if (dtype < 0 || dtype > 2 || M < 0 || D < 1) return 1;
    for (int64_t m = 0; m < M; m++) {
        double ss = 0.0;
        for (int64_t d = 0; d < D; d++) {
            float v = load1(dtype, x, m * D + d);
            if (delta) {
                v += load1(dtype, delta, m * D + d);
                store1(dtype, x, m * D + d, v);
                v = load1(dtype, x, m * D + d);  /* the residual as stored (rounded to the dtype) */
            }
            ss += (double)v * v;
        }
        float r = 1.0f / sqrtf((float)(ss / D) + eps);
        for (int64_t d = 0; d < D; d++) {
            float n = load1(dtype, x, m * D + d) * r;
            if (dtype != 0) {  /* round to the dtype, times weight, round again */
                store1(dtype, out, m * D + d, n);
                n = load1(dtype, out, m * D + d);
            }
            store1(dtype, out, m * D + d, n * load1(dtype, weight, d));
        }
    }
    return 0;
}

/* out (M, N) = silu(gu[:, :N]) * gu[:, N:] for gu (M, 2N), rounded like torch's silu(gate).mul_(up) (silu
 * rounded to the dtype first). */
int silu_mul(int dtype, const void *gu, void *out, int64_t M, int64_t N) {
    if (dtype < 0 || dtype > 2 || M < 0 || N < 0) return 1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float g = load1(dtype, gu, m * 2 * N + n), u = load1(dtype, gu, m * 2 * N + N + n);
            float s = g / (1.0f + expf(-g));
            if (dtype != 0) {
                store1(dtype, out, m * N + n, s);
                s = load1(dtype, out, m * N + n);
            }
            store1(dtype, out, m * N + n, s * u);
        }
    return 0;
}
