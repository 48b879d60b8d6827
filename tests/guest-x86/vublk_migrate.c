/* The x86_64 guest's disk and memory check across QEMU's live migration
 * (tests/test_vhost_user_qemu.py), with vublk.mode=migrate on the command line.
 *
 * After reading the whole disk (generation 0, the host's) it loops, round r
 * from 1, until a line arrives on stdin (the console):
 *   writes write_extent(r) of the disk with generation r (O_DIRECT);
 *   reads READ_SECTORS at read_start(r) into buffer r % BUFFERS and checks it:
 *     the backend writes those guest pages itself, so a migration learns of
 *     them only from the backend's dirty log;
 *   re-checks buffer (r + BUFFERS / 2) % BUFFERS, unchanged since its read
 *     (the CPU never writes those pages: a page a migration sent before the
 *     backend wrote it is stale on the target unless the backend logged it);
 *   writes page r % PAGES of a RAM region with generation r and re-checks
 *   page (r * 7) % PAGES.
 * It prints VHOST-MIG-READY once looping. When the line comes it re-checks
 * every buffer and page, fsyncs, reads the whole disk and checks it, and prints
 *   VHOST-BLK-CHECK ok bytes=N written=N ios=N rounds=N
 * The host replays write_extent() for rounds 1..N to check the image. */
#define _GNU_SOURCE
#include <stdatomic.h>

#include "vublk.h"

#define BUFFERS 16
#define READ_SECTORS 128 /* 64 KiB */
#define PAGES 2048       /* 8 MiB of RAM the CPU writes */
#define PAGE 4096
#define RAM_OFFSET (1ull << 40) /* RAM's pattern offsets are the disk's + this */

struct buffer {
    uint8_t *data;
    uint64_t start;                /* the sector it was read from */
    uint32_t gens[READ_SECTORS];   /* the generations it was read with */
    int filled;
};

static struct buffer buffers[BUFFERS];
static uint8_t *ram;
static uint32_t page_gen[PAGES];
static atomic_int stop_requested;

/* The extent round r writes: 1 to 128 sectors, every other one 4 KiB aligned. */
static void write_extent(uint64_t r, uint64_t sectors, uint64_t *start, uint64_t *count)
{
    *count = 1 + (r * 37) % 128;
    *start = (r * 7919) % (sectors - 128);
    if (r % 2)
        *start -= *start % 8;
}

static uint64_t read_start(uint64_t r, uint64_t sectors) { return (r * 104729) % (sectors - READ_SECTORS); }

static void check_buffer(const struct buffer *b, const char *what)
{
    if (!b->filled)
        return;
    for (size_t i = 0; i < READ_SECTORS * SECTOR; i += 8) {
        uint64_t at = b->start * SECTOR + i, got;
        uint64_t expected = pattern(b->gens[i / SECTOR], at);
        memcpy(&got, b->data + i, 8);
        if (got != expected)
            fail(what, at, 1, expected, got);
    }
}

static void check_page(uint64_t p)
{
    for (size_t i = 0; i < PAGE; i += 8) {
        uint64_t at = RAM_OFFSET + p * PAGE + i, got;
        uint64_t expected = pattern(page_gen[p], at);
        memcpy(&got, ram + p * PAGE + i, 8);
        if (got != expected)
            fail("ram", p * PAGE + i, 1, expected, got);
    }
}

static void *wait_for_line(void *arg)
{
    char c;
    (void)arg;
    while (read(0, &c, 1) == 1)
        if (c == '\n' || c == '\r')
            break;
    atomic_store(&stop_requested, 1);
    return NULL;
}

static void round_of_io(uint64_t r, uint64_t sectors)
{
    uint64_t start, count;
    write_extent(r, sectors, &start, &count);
    uint8_t *out = aligned(count * SECTOR);
    fill(out, start * SECTOR, count * SECTOR, (unsigned)r);
    if (pwrite(disk, out, count * SECTOR, (off_t)(start * SECTOR)) != (ssize_t)(count * SECTOR))
        fail("write", start * SECTOR, 0, 0, 0);
    free(out);
    for (uint64_t s = start; s < start + count; s++)
        gens[s] = (uint32_t)r;
    bytes_written += count * SECTOR;
    ios++;

    struct buffer *b = &buffers[r % BUFFERS];
    b->start = read_start(r, sectors);  /* no memset first: only the backend writes b->data */
    if (pread(disk, b->data, READ_SECTORS * SECTOR, (off_t)(b->start * SECTOR)) !=
        READ_SECTORS * SECTOR)
        fail("read", b->start * SECTOR, 0, 0, 0);
    memcpy(b->gens, gens + b->start, sizeof b->gens);
    b->filled = 1;
    check_buffer(b, "read");
    check_buffer(&buffers[(r + BUFFERS / 2) % BUFFERS], "buffer-kept");
    bytes_read += READ_SECTORS * SECTOR;
    ios++;

    uint64_t p = r % PAGES;
    page_gen[p] = (uint32_t)r;
    for (size_t i = 0; i < PAGE; i += 8) {
        uint64_t w = pattern(r, RAM_OFFSET + p * PAGE + i);
        memcpy(ram + p * PAGE + i, &w, 8);
    }
    check_page((r * 7) % PAGES);
}

int main(int argc, char **argv)
{
    uint64_t size = setup(argc > 1 ? argv[1] : "/dev/vda");
    uint64_t sectors = size / SECTOR;
    if (sectors < 2 * READ_SECTORS)
        fail("disk-too-small", size, 0, 0, 0);
    for (int i = 0; i < BUFFERS; i++)
        buffers[i].data = aligned(READ_SECTORS * SECTOR);
    ram = aligned((size_t)PAGES * PAGE);
    for (uint64_t p = 0; p < PAGES; p++)
        for (size_t i = 0; i < PAGE; i += 8) {
            uint64_t w = pattern(0, RAM_OFFSET + p * PAGE + i);
            memcpy(ram + p * PAGE + i, &w, 8);
        }
    check_disk(size, "initial");
    pthread_t waiter;
    if (pthread_create(&waiter, NULL, wait_for_line, NULL))
        fail("thread", 0, 0, 0, 0);
    printf("VHOST-MIG-READY\n");
    fflush(stdout);
    uint64_t r = 0;
    while (!atomic_load(&stop_requested))
        round_of_io(++r, sectors);
    for (int i = 0; i < BUFFERS; i++)
        check_buffer(&buffers[i], "buffer-final");
    for (uint64_t p = 0; p < PAGES; p++)
        check_page(p);
    if (fsync(disk))
        fail("fsync", 0, 0, 0, 0);
    check_disk(size, "final");
    printf("VHOST-BLK-CHECK ok bytes=%" PRIu64 " written=%" PRIu64 " ios=%" PRIu64
           " rounds=%" PRIu64 "\n",
           bytes_read + bytes_written, bytes_written, ios, r);
    fflush(stdout);
    return 0;
}
