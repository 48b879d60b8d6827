/* The nested guest's MTE probe (see tests/test_vmm_boot.py).
 *
 * Tags the granules of one locked PROT_MTE page with a known pattern, prints
 * the page's virtual and physical addresses (from /proc/self/pagemap) and
 * the tags, checks that an access with a wrong tag gets SEGV_MTESERR, then
 * waits (the VMM reads the tags meanwhile) for a line on stdin, or with
 * argument "memory" spins until a debugger writes RELEASE at RELEASE_OFFSET
 * in the page, and checks
 * that every tag and byte is still what it wrote; last, it times reads of an
 * address where no device is (each an MMIO exit to the VMM). Static, libc only. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mte.h"

#define GRANULES 64
#define RELEASE_OFFSET 2048 /* an untagged word of the page */
#define RELEASE 0x60d60dU
#define MMIO_HOLE 0x0c000000UL /* no device there (vmm/layout.py) */

static unsigned pattern(size_t i) { return (unsigned)((i * 7 + 3) & 0xf); }

/* Reads of a guest physical address where no device is: each one is an
 * MMIO exit the VMM's Python dispatch answers. Returns reads per second. */
static double mmio_reads_per_second(unsigned long address, int reads)
{
    int fd = open("/dev/mem", O_RDONLY | O_SYNC);
    if (fd < 0)
        return 0;
    volatile uint32_t *reg = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, (off_t)address);
    close(fd);
    if (reg == MAP_FAILED)
        return 0;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < reads; i++)
        (void)*reg;
    clock_gettime(CLOCK_MONOTONIC, &end);
    munmap((void *)reg, 4096);
    double seconds = (double)(end.tv_sec - start.tv_sec) + (double)(end.tv_nsec - start.tv_nsec) / 1e9;
    return seconds > 0 ? reads / seconds : 0;
}

static uint64_t physical(void *va, long page)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t entry = 0;
    if (fd < 0 || pread(fd, &entry, sizeof entry, (off_t)((uintptr_t)va / page * 8)) != 8)
        return 0;
    close(fd);
    if (!(entry >> 63))
        return 0;
    return (entry & ((1ULL << 55) - 1)) * (uint64_t)page;
}

int main(int argc, char **argv)
{
    long page = sysconf(_SC_PAGESIZE);
    if (enable_mte()) {
        perror("PROBE-ERROR prctl");
        return 1;
    }
    uint8_t *buf = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE | PROT_MTE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED || mlock(buf, (size_t)page)) {
        perror("PROBE-ERROR mmap PROT_MTE");
        return 1;
    }
    char tags[GRANULES + 1];
    for (size_t i = 0; i < GRANULES; i++) {
        uint8_t *granule = with_tag(buf + 16 * i, pattern(i));
        store_tag(granule);
        memset(granule, (int)(0x40 + i), 16);
        tags[i] = "0123456789abcdef"[pattern(i)];
    }
    tags[GRANULES] = 0;
    printf("PROBE-READY va=%#lx pa=%#llx granules=%d tags=%s fault=%s\n", (unsigned long)buf,
           (unsigned long long)physical(buf, page), GRANULES, tags,
           wrong_tag_faults(with_tag(buf, pattern(0) ^ 1)) ? "SEGV_MTESERR" : "none");
    fflush(stdout);

    if (argc > 1 && strcmp(argv[1], "memory") == 0) {
        /* Spin, as the running task, until a debugger writes RELEASE here. */
        volatile uint32_t *flag = (volatile uint32_t *)(buf + RELEASE_OFFSET);
        while (*flag != RELEASE)
            ;
    } else {
        char line[64];
        if (!fgets(line, sizeof line, stdin))
            return 3;
    }
    int intact = 1;
    for (size_t i = 0; i < GRANULES; i++) {
        uint8_t *granule = with_tag(buf + 16 * i, pattern(i));
        intact &= load_tag(granule) == pattern(i);
        for (int b = 0; b < 16; b++)
            intact &= granule[b] == (uint8_t)(0x40 + i);
    }
    printf("PROBE-DONE intact=%s fault=%s\n", intact ? "yes" : "no",
           wrong_tag_faults(with_tag(buf, pattern(0) ^ 1)) ? "SEGV_MTESERR" : "none");
    printf("PROBE-MMIO reads_per_second=%.0f\n", mmio_reads_per_second(MMIO_HOLE, 2000));
    return intact ? 0 : 4;
}
