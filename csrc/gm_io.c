#include "gm_io.h"

#include <errno.h>
#include <sys/uio.h>

#include "gm_insn.h"
#include "gm_platform.h"
#include "gm_route.h"
#include "gm_status.h"

/* Append one entry per run of equal tags in the span; return the count. */
static int tag_runs(const struct gm_span *span, struct iovec *iov, int n)
{
    uint8_t *p = span->guest;
    uint8_t *end = p + span->len;
    while (p < end && n < GM_IO_MAX_IOV) {
        unsigned tag = gm_ldg(p);
        uint8_t *next = (uint8_t *)(((uintptr_t)p | (GM_GRANULE - 1)) + 1);
        while (next < end && gm_ldg(next) == tag)
            next += GM_GRANULE;
        if (next > end)
            next = end;
        iov[n].iov_base = gm_with_tag(p, tag);
        iov[n].iov_len = (size_t)(next - p);
        n++;
        p = next;
    }
    return n;
}

static ssize_t transfer(int fd, int direction, const struct iovec *iov, int n, int64_t offset)
{
    if (offset < 0)
        return direction == GM_IO_INTO_GUEST ? readv(fd, iov, n) : writev(fd, iov, n);
    return direction == GM_IO_INTO_GUEST ? preadv(fd, iov, n, (off_t)offset)
                                         : pwritev(fd, iov, n, (off_t)offset);
}

/* The spans' first `done` bytes were written by the kernel: mark their pages. */
static void mark_written(const struct gm_space *space, const struct gm_span *spans,
                         size_t nspans, uint64_t done)
{
    for (size_t s = 0; s < nspans && done > 0; s++) {
        uint64_t n = spans[s].len < done ? spans[s].len : done;
        if (spans[s].region != NULL)
            gm_space_mark_region(space, spans[s].region, spans[s].gpa - spans[s].region->gpa, n);
        done -= n;
    }
}

static int64_t io(int fd, int direction, int mode, int route, const struct gm_span *spans,
                  size_t nspans, int64_t offset)
{
    struct iovec iov[GM_IO_MAX_IOV];
    int n = 0;
    int split = route == GM_ROUTE_MATCH_ALL && mode == GM_MODE_HARDWARE;

    if (route != GM_ROUTE_MATCH_ALL && route != GM_ROUTE_UNCHECKED_THREAD)
        return GM_ERR_UNSUPPORTED;
    if (split) {
        int status = gm_thread_enable_mte();
        if (status != GM_OK)
            return status;
    }
    for (size_t s = 0; s < nspans && n < GM_IO_MAX_IOV; s++) {
        if (split) {
            n = tag_runs(&spans[s], iov, n);
        } else {
            iov[n].iov_base = spans[s].guest;
            iov[n].iov_len = spans[s].len;
            n++;
        }
    }
    if (route == GM_ROUTE_MATCH_ALL) {
        ssize_t done = transfer(fd, direction, iov, n, offset);
        return done < 0 ? GM_ERR_ERRNO : (int64_t)done;
    }
    int status = gm_unchecked_thread_enter();
    if (status != GM_OK)
        return status;
    ssize_t done = transfer(fd, direction, iov, n, offset);
    int saved = errno;
    status = gm_unchecked_thread_exit();
    if (status != GM_OK)
        return status;
    errno = saved;
    return done < 0 ? GM_ERR_ERRNO : (int64_t)done;
}

int64_t gm_io(int fd, int direction, const struct gm_space *space, int route,
              const struct gm_span *spans, size_t nspans, int64_t offset)
{
    int64_t done = io(fd, direction, space->mode, route, spans, nspans, offset);
    if (done > 0 && direction == GM_IO_INTO_GUEST)
        mark_written(space, spans, nspans, (uint64_t)done);
    return done;
}

int64_t gm_io_span(int fd, int direction, const struct gm_space *space, int route,
                   const struct gm_space_region *region, uint8_t *guest, uint64_t gpa,
                   size_t len, int64_t offset)
{
    struct gm_span span = {
        .gpa = gpa, .guest = guest, .table = NULL, .len = len, .region = region,
    };
    return gm_io(fd, direction, space, route, &span, 1, offset);
}
