/* The native kernels' one thread pool: parallel_for(fn, ctx, n, nthreads) runs fn(ctx, i) for i in [0, n) on
 * the caller and up to nthreads - 1 persistent workers.
 *
 * Items are claimed from one atomic counter, so a worker that wakes late (a busy machine) finds nothing left
 * rather than stalling the caller: the worst case is the single-thread speed. Workers spin briefly after a job
 * (a decode step issues ~150 of them back to back, microseconds apart), then sleep on a condition variable.
 * The job lives in static storage (one call at a time), and the counter sits at CLOSED between jobs so a late
 * worker never claims from a job being written. Threads are made once, not per call (pthread_create and join
 * cost tens of microseconds, a fifth of a small GEMV).
 */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>

#include "native.h"

#define MAX_THREADS 64
#define CLOSED (INT64_C(1) << 40)
#define SPINS 4000  /* pause instructions a worker spins before it sleeps (~100 us on the EPYC) */

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static int pool_size = 0;
static void (*job_fn)(void *, int64_t);
static void *job_ctx;
static int64_t job_n;
static int64_t pool_gen = 0, pool_next = CLOSED, pool_done = 0;

static void claim(void) {
    for (;;) {
        int64_t i = __atomic_fetch_add(&pool_next, 1, __ATOMIC_ACQ_REL);
        if (i >= job_n) return;
        job_fn(job_ctx, i);
        __atomic_fetch_add(&pool_done, 1, __ATOMIC_ACQ_REL);
    }
}

static void *pool_worker(void *arg) {
    (void)arg;
    int64_t seen = 0;
    for (;;) {
        int64_t gen;
        int spins = 0;
        while ((gen = __atomic_load_n(&pool_gen, __ATOMIC_ACQUIRE)) == seen && spins < SPINS) {
            __builtin_ia32_pause();
            spins++;
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool_mu);
            while ((gen = __atomic_load_n(&pool_gen, __ATOMIC_ACQUIRE)) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
        }
        seen = gen;
        claim();
    }
    return NULL;
}

void parallel_for(void (*fn)(void *, int64_t), void *ctx, int64_t n, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > n) nthreads = (int)n;
    if (nthreads <= 1) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&call_mu);
    pthread_mutex_lock(&pool_mu);
    while (pool_size < nthreads - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, pool_worker, NULL) != 0) break;  /* fewer threads: still correct */
        pthread_detach(t);
        pool_size++;
    }
    job_fn = fn;
    job_ctx = ctx;
    job_n = n;
    __atomic_store_n(&pool_done, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&pool_next, 0, __ATOMIC_RELEASE);
    __atomic_fetch_add(&pool_gen, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    claim();
    int64_t spins = 0;  /* the items the workers claimed: being finished now */
    while (__atomic_load_n(&pool_done, __ATOMIC_ACQUIRE) < n) {
        if (++spins < 2000) __builtin_ia32_pause();
        else sched_yield();
    }
    __atomic_store_n(&pool_next, CLOSED, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&call_mu);
}
