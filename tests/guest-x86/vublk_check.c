/* The x86_64 guest's disk check for the vhost-user lane (tests/test_vhost_user_qemu.py):
 * O_DIRECT I/O on /dev/vda, served by a vhost-user-blk backend, with every
 * byte checked.
 *
 * The host writes pattern generation 0 over the whole image and puts a plan on
 * the kernel command line (read from /proc/cmdline):
 *   vublk.seed=HEX       the pattern's seed
 *   vublk.plan=GROUPS    groups split by '/', extents in a group by ',', an
 *                        extent being START:COUNT:SEGMENTS in 512-byte sectors;
 *                        the n-th extent of the plan (from 1) writes generation n
 * The program reads the whole disk and checks generation 0; then, group by
 * group, writes the group's extents concurrently (one thread each, pwritev with
 * SEGMENTS 4 KiB-aligned buffers, so one request of several segments),
 * fdatasyncs, and reads each extent back (preadv) and checks it; then fsyncs
 * and reads the whole disk again, checking each sector against the generation
 * that last wrote it. Word w (8 bytes, little endian) at byte offset o of
 * generation g is pattern(seed, g, o) below; the host computes the same.
 * One line on the console says how it went:
 *   VHOST-BLK-CHECK ok bytes=N written=N ios=N
 *   VHOST-BLK-CHECK fail what=WHAT offset=N [expected=HEX got=HEX] */
#define _GNU_SOURCE
#include "vublk.h"

#define MAX_EXTENTS 64
#define MAX_SEGMENTS 16

struct extent {
    uint64_t start, count; /* sectors */
    unsigned segments;
    unsigned gen;
};

static struct extent plan[MAX_EXTENTS];
static unsigned extents, groups;
static unsigned group_start[MAX_EXTENTS + 1]; /* group g: plan[group_start[g] .. group_start[g + 1]) */

/* The extent's bytes as SEGMENTS 4 KiB-aligned buffers of whole sectors. */
static int segments_of(const struct extent *e, struct iovec *iov)
{
    unsigned n = e->segments;
    for (unsigned i = 0; i < n; i++) {
        uint64_t sectors = e->count / n + (i + 1 == n ? e->count % n : 0);
        iov[i].iov_len = sectors * SECTOR;
        iov[i].iov_base = aligned(iov[i].iov_len);
    }
    return (int)n;
}

static void *write_extent(void *arg)
{
    const struct extent *e = arg;
    struct iovec iov[MAX_SEGMENTS];
    int n = segments_of(e, iov);
    uint64_t offset = e->start * SECTOR, at = offset;
    for (int i = 0; i < n; i++) {
        fill(iov[i].iov_base, at, iov[i].iov_len, e->gen);
        at += iov[i].iov_len;
    }
    ssize_t done = pwritev(disk, iov, n, (off_t)offset);
    if (done != (ssize_t)(e->count * SECTOR))
        fail("write", offset, 0, 0, 0);
    for (int i = 0; i < n; i++)
        free(iov[i].iov_base);
    return NULL;
}

static void *read_extent(void *arg)
{
    const struct extent *e = arg;
    struct iovec iov[MAX_SEGMENTS];
    int n = segments_of(e, iov);
    uint64_t offset = e->start * SECTOR, at = offset;
    for (int i = 0; i < n; i++)
        memset(iov[i].iov_base, 0xa5, iov[i].iov_len);
    ssize_t done = preadv(disk, iov, n, (off_t)offset);
    if (done != (ssize_t)(e->count * SECTOR))
        fail("read-back", offset, 0, 0, 0);
    for (int i = 0; i < n; i++) {
        check(iov[i].iov_base, at, iov[i].iov_len, "read-back");
        at += iov[i].iov_len;
        free(iov[i].iov_base);
    }
    return NULL;
}

/* Parse START:COUNT:SEGMENTS,...[/...] into plan[] and group_start[]; the
 * extents of a group must not overlap (they are written at the same time). */
static void parse_plan(const char *text, uint64_t sectors)
{
    const char *p = text;
    groups = 1;
    group_start[0] = 0;
    while (*p && *p != ' ' && *p != '\n') {
        struct extent *e = &plan[extents];
        char *end;
        if (extents == MAX_EXTENTS)
            fail("plan-too-long", extents, 0, 0, 0);
        e->start = strtoull(p, &end, 10);
        if (*end != ':')
            fail("plan-syntax", (uint64_t)(p - text), 0, 0, 0);
        e->count = strtoull(end + 1, &end, 10);
        if (*end != ':')
            fail("plan-syntax", (uint64_t)(p - text), 0, 0, 0);
        e->segments = (unsigned)strtoul(end + 1, &end, 10);
        if (e->count == 0 || e->start + e->count > sectors || e->segments == 0 ||
            e->segments > MAX_SEGMENTS || e->segments > e->count)
            fail("plan-extent", e->start, 0, 0, 0);
        for (unsigned i = group_start[groups - 1]; i < extents; i++)
            if (plan[i].start < e->start + e->count && e->start < plan[i].start + plan[i].count)
                fail("plan-overlap", e->start, 0, 0, 0);
        e->gen = ++extents;
        p = end;
        if (*p == '/')
            group_start[groups++] = extents;
        if (*p == ',' || *p == '/')
            p++;
    }
    group_start[groups] = extents;
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "/dev/vda";
    uint64_t size = setup(path);
    const char *plan_text = cmdline_value(cmdline(), "vublk.plan=");
    if (!plan_text)
        fail("cmdline-missing-plan", 0, 0, 0, 0);
    parse_plan(plan_text, size / SECTOR);

    check_disk(size, "initial");
    pthread_t threads[MAX_EXTENTS];
    for (unsigned g = 0; g < groups; g++) {
        unsigned first = group_start[g], end = group_start[g + 1];
        for (unsigned i = first; i < end; i++)
            if (pthread_create(&threads[i], NULL, write_extent, &plan[i]))
                fail("thread", i, 0, 0, 0);
        for (unsigned i = first; i < end; i++)
            pthread_join(threads[i], NULL);
        if (fdatasync(disk))
            fail("fdatasync", 0, 0, 0, 0);
        for (unsigned i = first; i < end; i++) {
            for (uint64_t s = plan[i].start; s < plan[i].start + plan[i].count; s++)
                gens[s] = plan[i].gen;
            ios++;
            bytes_written += plan[i].count * SECTOR;
        }
        for (unsigned i = first; i < end; i++)
            if (pthread_create(&threads[i], NULL, read_extent, &plan[i]))
                fail("thread", i, 0, 0, 0);
        for (unsigned i = first; i < end; i++) {
            pthread_join(threads[i], NULL);
            ios++;
            bytes_read += plan[i].count * SECTOR;
        }
    }
    if (fsync(disk))
        fail("fsync", 0, 0, 0, 0);
    check_disk(size, "final");
    close(disk);
    printf("VHOST-BLK-CHECK ok bytes=%" PRIu64 " written=%" PRIu64 " ios=%" PRIu64
           " extents=%u groups=%u\n",
           bytes_read + bytes_written, bytes_written, ios, extents, groups);
    fflush(stdout);
    return 0;
}
