#include "gm_bench.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "gm_route.h"
#include "gm_status.h"

/* A prime step visits every slot once per round unless it divides `slots`;
 * the jumps defeat the hardware prefetcher, which a cold access must face. */
#define GM_BENCH_STEP 7919u

static uint64_t gm_bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static size_t gm_bench_step(size_t slots)
{
    return slots % GM_BENCH_STEP ? GM_BENCH_STEP % slots : 1;
}

/* Run one single-span access `iterations` times. thread_scope: inside one
 * unchecked-thread scope (the UNCHECKED_THREAD route then makes no
 * system call per access: the scopes nest). */
int gm_bench_access(const struct gm_bench_core *core, struct gm_access *a, size_t stride,
                    size_t slots, size_t iterations, int thread_scope, uint64_t *nanoseconds)
{
    if (slots == 0 || a->nspans != 1) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    struct gm_span span = a->spans[0];
    const struct gm_span *original = a->spans;
    uint8_t *base = span.guest;
    uint64_t gpa = span.gpa;
    uint8_t *table = span.table;
    size_t step = gm_bench_step(slots);
    size_t slot = 0;
    int status = GM_OK;
    if (thread_scope) {
        status = core->unchecked_thread_enter();
        if (status != GM_OK)
            return status;
    }
    a->spans = &span;
    uint64_t start = gm_bench_now();
    for (size_t i = 0; i < iterations && status == GM_OK; i++) {
        size_t at = slot * stride;
        span.guest = base + at;
        span.gpa = gpa + at;
        span.table = table ? table + at / 16 : NULL;
        status = core->access(a);
        slot = (slot + step) % slots;
    }
    *nanoseconds = gm_bench_now() - start;
    a->spans = original;
    if (thread_scope) {
        int exit_status = core->unchecked_thread_exit();
        if (status == GM_OK)
            status = exit_status;
    }
    return status;
}

/* The baselines: memcpy between untagged buffers, or on guest memory with
 * tag checks off for the thread. */
int gm_bench_memcpy(const struct gm_bench_core *core, uint8_t *dst, const uint8_t *src,
                    size_t len, size_t stride, size_t slots, size_t iterations, int checks_off,
                    uint64_t *nanoseconds)
{
    if (slots == 0) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    if (checks_off) {
        int status = core->unchecked_thread_enter();
        if (status != GM_OK)
            return status;
    }
    size_t step = gm_bench_step(slots);
    size_t slot = 0;
    uint64_t start = gm_bench_now();
    for (size_t i = 0; i < iterations; i++) {
        memcpy(dst, src + slot * stride, len);
        __asm__ volatile("" : : "r"(dst) : "memory");
        slot = (slot + step) % slots;
    }
    *nanoseconds = gm_bench_now() - start;
    return checks_off ? core->unchecked_thread_exit() : GM_OK;
}
