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
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SECTOR 512
#define CHUNK (1024 * 1024)
#define MAX_EXTENTS 64
#define MAX_SEGMENTS 16

struct extent {
    uint64_t start, count; /* sectors */
    unsigned segments;
    unsigned gen;
};

static uint64_t seed;
static int disk;
static struct extent plan[MAX_EXTENTS];
static unsigned extents, groups;
static unsigned group_start[MAX_EXTENTS + 1]; /* group g: plan[group_start[g] .. group_start[g + 1]) */
static uint32_t *gens; /* the generation each sector holds */
static uint64_t ios, bytes_read, bytes_written;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t pattern(uint64_t g, uint64_t offset)
{
    uint64_t z = seed + g * 0x9E3779B97F4A7C15ull + offset * 0xD1B54A32D192ED03ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill(uint8_t *buf, uint64_t offset, size_t len, unsigned g)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = pattern(g, offset + i);
        memcpy(buf + i, &w, 8);
    }
}

/* Print the failure line (once, whichever thread finds it first) and exit. */
static void fail(const char *what, uint64_t offset, int has_words, uint64_t expected, uint64_t got)
{
    pthread_mutex_lock(&lock);
    if (has_words)
        printf("VHOST-BLK-CHECK fail what=%s offset=%" PRIu64 " expected=%016" PRIx64
               " got=%016" PRIx64 "\n",
               what, offset, expected, got);
    else
        printf("VHOST-BLK-CHECK fail what=%s offset=%" PRIu64 " errno=%d\n", what, offset, errno);
    fflush(stdout);
    exit(1);
}

/* Check ``len`` bytes read at ``offset`` against each sector's generation. */
static void check(const uint8_t *buf, uint64_t offset, size_t len, const char *what)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t at = offset + i, got;
        uint64_t expected = pattern(gens[at / SECTOR], at);
        memcpy(&got, buf + i, 8);
        if (got != expected)
            fail(what, at, 1, expected, got);
    }
}

static void *aligned(size_t len)
{
    void *p = aligned_alloc(4096, (len + 4095) & ~(size_t)4095);
    if (!p)
        fail("alloc", len, 0, 0, 0);
    return p;
}

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

/* Read the whole disk in 1 MiB reads and check every byte. */
static void check_disk(uint64_t size, const char *what)
{
    uint8_t *buf = aligned(CHUNK);
    for (uint64_t offset = 0; offset < size; offset += CHUNK) {
        size_t len = size - offset < CHUNK ? (size_t)(size - offset) : CHUNK;
        memset(buf, 0xa5, len);
        if (pread(disk, buf, len, (off_t)offset) != (ssize_t)len)
            fail(what, offset, 0, 0, 0);
        check(buf, offset, len, what);
        ios++;
        bytes_read += len;
    }
    free(buf);
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

static const char *cmdline_value(const char *cmdline, const char *key)
{
    const char *at = strstr(cmdline, key);
    return at ? at + strlen(key) : NULL;
}

static int open_disk(const char *path)
{
    for (int i = 0; i < 300; i++) { /* the driver may still be probing */
        int fd = open(path, O_RDWR | O_DIRECT);
        if (fd >= 0)
            return fd;
        struct timespec t = {0, 100 * 1000 * 1000};
        nanosleep(&t, NULL);
    }
    fail("open", 0, 0, 0, 0);
    return -1;
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "/dev/vda";
    static char cmdline[4096];
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f || !fgets(cmdline, sizeof cmdline, f))
        fail("cmdline", 0, 0, 0, 0);
    fclose(f);
    const char *seed_text = cmdline_value(cmdline, "vublk.seed=");
    const char *plan_text = cmdline_value(cmdline, "vublk.plan=");
    if (!seed_text || !plan_text)
        fail("cmdline-missing-seed-or-plan", 0, 0, 0, 0);
    seed = strtoull(seed_text, NULL, 16);

    disk = open_disk(path);
    uint64_t size = 0;
    int block = 0;
    if (ioctl(disk, BLKGETSIZE64, &size) || ioctl(disk, BLKSSZGET, &block))
        fail("ioctl", 0, 0, 0, 0);
    if (block != SECTOR || size % SECTOR || size == 0)
        fail("geometry", size, 1, SECTOR, (uint64_t)block);
    gens = calloc(size / SECTOR, sizeof *gens);
    if (!gens)
        fail("alloc", size, 0, 0, 0);
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
