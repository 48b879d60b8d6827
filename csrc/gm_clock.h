/* Timing loops for the benchmarks: clock_gettime around native loops, so
 * the figures show the core's cost without the binding's. */
#ifndef GM_CLOCK_H
#define GM_CLOCK_H

#include <stddef.h>
#include <stdint.h>

struct gm_access;

int gm_clock_access(struct gm_access *access, size_t stride, size_t slots, size_t iterations,
                    uint64_t *nanoseconds);
int gm_clock_memcpy(uint8_t *dst, const uint8_t *src, size_t len, size_t stride, size_t slots,
                    size_t iterations, int checks_off, uint64_t *nanoseconds);

#endif
