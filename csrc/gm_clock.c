#include "gm_clock.h"

#include <string.h>
#include <time.h>

#include "gm_platform.h"
#include "gm_route.h"
#include "gm_status.h"

static uint64_t now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Run one single-span access `iterations` times, its guest address rotating
 * over `slots` places `stride` bytes apart (1 slot: warm; many: cold). */
int gm_clock_access(struct gm_access *a, size_t stride, size_t slots, size_t iterations,
                    uint64_t *nanoseconds)
{
    struct gm_span span = a->spans[0];
    const struct gm_span *original = a->spans;
    a->spans = &span;
    a->nspans = 1;
    uint8_t *base = span.guest;
    uint64_t gpa = span.gpa;
    uint8_t *table = span.table;
    int status = GM_OK;
    uint64_t start = now();
    for (size_t i = 0; i < iterations && status == GM_OK; i++) {
        size_t at = (i % slots) * stride;
        span.guest = base + at;
        span.gpa = gpa + at;
        span.table = table ? table + at / 16 : NULL;
        status = gm_access(a);
    }
    *nanoseconds = now() - start;
    a->spans = original;
    return status;
}

/* The baselines: memcpy between untagged buffers, or on guest memory with
 * tag checks off for the thread. */
int gm_clock_memcpy(uint8_t *dst, const uint8_t *src, size_t len, size_t stride, size_t slots,
                    size_t iterations, int checks_off, uint64_t *nanoseconds)
{
    if (checks_off) {
        int status = gm_unchecked_thread_enter();
        if (status != GM_OK)
            return status;
    }
    uint64_t start = now();
    for (size_t i = 0; i < iterations; i++) {
        memcpy(dst, src + (i % slots) * stride, len);
        __asm__ volatile("" : : "r"(dst) : "memory");
    }
    *nanoseconds = now() - start;
    return checks_off ? gm_unchecked_thread_exit() : GM_OK;
}
