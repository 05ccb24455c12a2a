/* What the native kernels share: the element-type codes, scalar loads and stores of each type (float32
 * arithmetic), and the entry points one kernel calls in another (the thread pool of pool.c; the fused decode step,
 * decode_step.c, runs gemv.c's GEMV and elementwise steps and paged_decode.c's attention; each is also called from Python alone).
 *
 * Element types: 0 float32, 1 bfloat16, 2 float16.
 */
#ifndef MEMATTN_NATIVE_H
#define MEMATTN_NATIVE_H

#include <stdint.h>
#include <string.h>

/* element i of p as float32 */
static inline float load1(int dtype, const void *p, int64_t i) {
    if (dtype == 0) return ((const float *)p)[i];
    if (dtype == 2) return (float)((const _Float16 *)p)[i];
    uint32_t w = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}

/* v rounded to nearest even into element i of p */
static inline void store1(int dtype, void *p, int64_t i, float v) {
    if (dtype == 0) { ((float *)p)[i] = v; return; }
    if (dtype == 2) { ((_Float16 *)p)[i] = (_Float16)v; return; }
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    if ((b & 0x7fffffffu) > 0x7f800000u) b |= 0x00400000u;          /* NaN stays a (quiet) NaN */
    else b += 0x7fffu + ((b >> 16) & 1u);                           /* round to nearest even */
    ((uint16_t *)p)[i] = (uint16_t)(b >> 16);
}

/* v rounded to the type and back (a no-op for float32) */
static inline float round_to(int dtype, float v) {
    if (dtype == 0) return v;
    uint16_t h;
    store1(dtype, &h, 0, v);
    return load1(dtype, &h, 0);
}

static inline int64_t elem_size(int dtype) { return dtype == 0 ? 4 : 2; }

/* fn(ctx, i) for i in [0, n) on the caller and the pool's workers (pool.c); one call at a time */
void parallel_for(void (*fn)(void *, int64_t), void *ctx, int64_t n, int nthreads);

int gemv(int dtype, int out_dtype, const float *x, int64_t M, const void *w, int64_t N, int64_t K,
         const float *bias, void *y, int nthreads);
int add_rms_norm(int dtype, void *x, const void *delta, const void *weight, void *out, int64_t M, int64_t D,
                 float eps);
int silu_mul(int dtype, const void *gu, void *out, int64_t M, int64_t N);
int paged_decode(int dtype, const float *q, const void *kc, const void *vc, const int32_t *table, int64_t table_width,
                 const int64_t *lens, const int64_t *starts, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                 int64_t bs, float scale, float softcap, const float *slopes, int64_t nsplit,
                 int64_t blocks_per_split, float *out, float *lse, int nthreads);

#endif
