/* Timing loops for the benchmarks: clock_gettime(CLOCK_MONOTONIC) around
 * native loops, so the figures show the core's cost without the binding's.
 * They live in an extension of their own (guestmem.tools.bench._gmbench),
 * not in the production core, and call the core through the function
 * pointers the caller gives them, so they time the very code users run.
 * The address of each iteration visits `slots` places `stride` bytes apart
 * in a scrambled order (1 slot: warm, the same buffer every time; enough
 * slots to cover several times the last-level cache: cold). */
#ifndef GM_BENCH_H
#define GM_BENCH_H

#include <stddef.h>
#include <stdint.h>

struct gm_access;

/* The production core's entry points the loops call. */
struct gm_bench_core {
    int (*access)(struct gm_access *access);
    int (*unchecked_thread_enter)(void);
    int (*unchecked_thread_exit)(void);
};

int gm_bench_access(const struct gm_bench_core *core, struct gm_access *access, size_t stride,
                    size_t slots, size_t iterations, int thread_scope, uint64_t *nanoseconds);
int gm_bench_memcpy(const struct gm_bench_core *core, uint8_t *dst, const uint8_t *src,
                    size_t len, size_t stride, size_t slots, size_t iterations, int checks_off,
                    uint64_t *nanoseconds);

#endif
