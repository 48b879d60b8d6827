/* System-call I/O over guest spans: one readv(2) or writev(2) whose iovec is
 * built natively, for the routes that are safe around system calls.
 * MATCH_ALL under HARDWARE: one iovec entry per run of equal allocation
 * tags, through a pointer carrying the run's tag, so the kernel checks every
 * byte and finds it matching. Elsewhere one entry per span (the kernel
 * checks nothing there). UNCHECKED_THREAD: the thread's checks are off
 * around the call. At most GM_IO_MAX_IOV entries: the rest is a short
 * transfer, as with any readv. */
#ifndef GM_IO_H
#define GM_IO_H

#include <stddef.h>
#include <stdint.h>

#include "gm_space.h"

struct gm_span;

enum gm_io_direction {
    GM_IO_INTO_GUEST = 0,   /* readv: fd -> guest */
    GM_IO_FROM_GUEST = 1,   /* writev: guest -> fd */
    GM_IO_MAX_IOV = 1024
};

/* Bytes moved (>= 0), or GM_ERR_ERRNO with errno set, or GM_ERR_UNSUPPORTED
 * for a route other than MATCH_ALL and UNCHECKED_THREAD. ``offset`` < 0:
 * readv/writev at the file's position; else preadv/pwritev at ``offset``
 * (a disk image, whose position a device model must not share). The tag
 * mode is the space's; INTO_GUEST marks the bytes the kernel wrote dirty in
 * the spans' regions (a span whose region is NULL is not marked). */
int64_t gm_io(int fd, int direction, const struct gm_space *space, int route,
              const struct gm_span *spans, size_t nspans, int64_t offset);
/* The same over one span given by its scalars (and its region's entry in the
 * space, or NULL): the binding's fast path (no span array to allocate). */
int64_t gm_io_span(int fd, int direction, const struct gm_space *space, int route,
                   const struct gm_space_region *region, uint8_t *guest, uint64_t gpa,
                   size_t len, int64_t offset);

#endif
