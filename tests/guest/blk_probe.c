/* The nested guest's block probe (see tests/test_vmm_virtio.py): O_DIRECT I/O
 * between the virtio-blk disk and a PROT_MTE buffer whose granules carry
 * varied tags, so the VMM's device model writes into, and reads from, guest
 * pages the guest has tagged.
 *
 * Reads 64 KiB at 1 MiB (the host wrote the pattern in_byte() there) and
 * checks every byte and tag; fills the buffer with out_byte() and writes it
 * at 12 MiB (the host checks it after the run); checks that the tags are
 * still the guest's and that a wrong tag still faults; last, times 4 KiB
 * O_DIRECT reads at queue depth 1 and 32 (threads). Prints two lines:
 * BLK-PROBE read=ok|bad tags=ok|bad write=ok|bad fault=SEGV_MTESERR|none
 * BLK-RATE qd1_4k_reads_per_second=N qd32_4k_reads_per_second=N */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mte.h"

#define SIZE (64 * 1024)
#define READ_AT (1024 * 1024)
#define WRITE_AT (12 * 1024 * 1024) /* above what mkdosfs and one file touch later */

static unsigned tag_of(size_t granule) { return (unsigned)((granule * 5 + 1) & 0xf); }
static uint8_t in_byte(uint64_t offset) { return (uint8_t)(offset * 13 + (offset >> 9)); }
static uint8_t out_byte(uint64_t offset) { return (uint8_t)(offset * 29 + 7); }

static int tags_intact(uint8_t *buf)
{
    for (size_t g = 0; g < SIZE / 16; g++)
        if (load_tag(with_tag(buf + 16 * g, tag_of(g))) != tag_of(g))
            return 0;
    return 1;
}

static int full(ssize_t done) { return done == SIZE; }

struct reader {
    int fd;
    int reads;
    int failed;
    uint8_t *buf;
};

static void *read_blocks(void *arg)
{
    struct reader *r = arg;
    for (int i = 0; i < r->reads; i++)
        if (pread(r->fd, r->buf, 4096, (off_t)(i % 256) * 4096) != 4096)
            r->failed = 1;
    return NULL;
}

/* 4 KiB O_DIRECT reads per second with ``depth`` threads each keeping one in
 * flight (queue depth ``depth``), ``reads`` in all; 0 if any read failed. */
static double reads_per_second(int fd, int depth, int reads)
{
    pthread_t threads[32];
    struct reader readers[32];
    uint8_t *bufs = mmap(NULL, 4096 * (size_t)depth, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (depth > 32 || bufs == MAP_FAILED)
        return 0;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int t = 0; t < depth; t++) {
        readers[t] = (struct reader){fd, reads / depth, 0, bufs + 4096 * t};
        pthread_create(&threads[t], NULL, read_blocks, &readers[t]);
    }
    int failed = 0;
    for (int t = 0; t < depth; t++) {
        pthread_join(threads[t], NULL);
        failed |= readers[t].failed;
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    munmap(bufs, 4096 * (size_t)depth);
    double seconds = (double)(end.tv_sec - start.tv_sec) + (double)(end.tv_nsec - start.tv_nsec) / 1e9;
    return failed || seconds <= 0 ? 0 : (reads / depth * depth) / seconds;
}

int main(int argc, char **argv)
{
    if (argc != 2 || enable_mte()) {
        perror("BLK-ERROR setup");
        return 1;
    }
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    uint8_t *buf = mmap(NULL, SIZE, PROT_READ | PROT_WRITE | PROT_MTE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fd < 0 || buf == MAP_FAILED) {
        perror("BLK-ERROR open/mmap");
        return 1;
    }
    for (size_t g = 0; g < SIZE / 16; g++) {
        uint8_t *granule = with_tag(buf + 16 * g, tag_of(g));
        store_tag(granule);
        memset(granule, 0xee, 16);
    }
    /* The kernel untags the pointer for the DMA; the granules keep their own tags. */
    int read_ok = full(pread(fd, with_tag(buf, tag_of(0)), SIZE, READ_AT));
    for (size_t i = 0; read_ok && i < SIZE; i++)
        read_ok = with_tag(buf + i, tag_of(i / 16))[0] == in_byte(READ_AT + i);
    int tags_ok = tags_intact(buf);
    for (size_t i = 0; i < SIZE; i++)
        with_tag(buf + i, tag_of(i / 16))[0] = out_byte(WRITE_AT + i);
    int write_ok = full(pwrite(fd, with_tag(buf, tag_of(0)), SIZE, WRITE_AT)) && fsync(fd) == 0;
    tags_ok &= tags_intact(buf);
    printf("BLK-PROBE read=%s tags=%s write=%s fault=%s\n", read_ok ? "ok" : "bad",
           tags_ok ? "ok" : "bad", write_ok ? "ok" : "bad",
           wrong_tag_faults(with_tag(buf + 16 * 3, tag_of(3) ^ 1)) ? "SEGV_MTESERR" : "none");
    printf("BLK-RATE qd1_4k_reads_per_second=%.0f qd32_4k_reads_per_second=%.0f\n",
           reads_per_second(fd, 1, 500), reads_per_second(fd, 32, 1024));
    return read_ok && tags_ok && write_ok ? 0 : 4;
}
