/* Timing loops for the benchmarks: clock_gettime(CLOCK_MONOTONIC) around
 * native loops, so the figures show the core's cost without the binding's.
 * The address of each iteration visits `slots` places `stride` bytes apart
 * in a scrambled order (1 slot: warm, the same buffer every time; enough
 * slots to cover several times the last-level cache: cold). */
#ifndef GM_BENCH_H
#define GM_BENCH_H

#include <stddef.h>
#include <stdint.h>

struct gm_access;

int gm_bench_access(struct gm_access *access, size_t stride, size_t slots, size_t iterations,
                    int thread_scope, uint64_t *nanoseconds);
int gm_bench_memcpy(uint8_t *dst, const uint8_t *src, size_t len, size_t stride, size_t slots,
                    size_t iterations, int checks_off, uint64_t *nanoseconds);

#endif
