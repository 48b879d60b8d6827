/* What the x86_64 guest's disk checks share (vublk_check.c, vublk_migrate.c):
 * the pattern, the failure line, whole-disk checks, the command line. Word w
 * (8 bytes, little endian) at byte offset o of generation g is pattern(g, o);
 * the host computes the same (tests/x86_guest.py). gens[] holds the
 * generation each 512-byte sector should hold now. */
#ifndef VUBLK_H
#define VUBLK_H
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

static uint64_t seed;
static int disk;
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

/* The kernel's command line (read once). */
static const char *cmdline(void)
{
    static char line[4096];
    if (!line[0]) {
        FILE *f = fopen("/proc/cmdline", "r");
        if (!f || !fgets(line, sizeof line, f))
            fail("cmdline", 0, 0, 0, 0);
        fclose(f);
    }
    return line;
}

/* Open the disk for O_DIRECT I/O, read the seed, and start every sector at
 * generation 0 (the host's); returns the disk's size in bytes. */
static uint64_t setup(const char *path)
{
    const char *seed_text = cmdline_value(cmdline(), "vublk.seed=");
    if (!seed_text)
        fail("cmdline-missing-seed", 0, 0, 0, 0);
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
    return size;
}
#endif
