/* The nested guest's live-migration probe: proves a migration lost no data
 * and no MTE tag, while keeping many pages changing as it runs.
 *
 * Fills a PROT_MTE buffer (argv[1] MiB, default 32) granule by granule with
 * data and a tag derived from (generation, granule), then steps through it
 * forever one 4 KiB chunk at a time: each step checks that the chunk's tags
 * (LDG) and data are what it last wrote there, counts what is not, and writes
 * the chunk's next generation: new tags and data (STGP), or on every third
 * visit new tags only (STG), since a tag-only store must survive a migration
 * too. The generations live in an ordinary malloc'd array, outside the
 * tagged buffer. Each step is timed, so a migration's pause shows as a gap.
 *
 * Prints, short because each byte on the emulated UART costs about 0.7 ms:
 * MIG-PROBE-READY mib=N                                  once, after the fill
 * MIG-PROBE tick=N passes=N bad_data=N bad_tags=N fault=F maxgap_ms=N
 *     about every 2 s; fault is what a forked wrong-tag load got (SEGV_MTESERR
 *     when tag checks still work), maxgap_ms the longest step-to-step gap
 *     since the previous line; bad_* count granules, cumulatively
 * MIG-PROBE-DONE passes=N bad_data=N bad_tags=N fault=F
 *     once a line arrives on stdin, after a last check of the whole buffer;
 *     exit 0 if nothing was bad and the fault was SEGV_MTESERR, else 1.
 * argv[2] "selftest-corrupt" breaks one byte and one tag after the first pass,
 * behind the probe's back, to show the checks can fail. Static, libc only. */
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mte.h"

#define CHUNK 4096
#define GRANULES_PER_CHUNK (CHUNK / 16)
#define TICK_NS 2000000000LL
#define POLL_EVERY 16 /* steps between looks at stdin */

struct chunk {
    uint32_t gen;      /* tags: changed on every visit */
    uint32_t data_gen; /* data: changed on two visits in three */
};

struct probe {
    uint8_t *buf;
    struct chunk *chunks;
    size_t count;
    unsigned long bad_data, bad_tags;
};

static unsigned tag_of(uint32_t gen, size_t granule)
{
    return (unsigned)((granule * 7 + gen * 5 + 3) & 0xf); /* 5 is odd: every visit retags */
}

static uint64_t word_of(uint32_t data_gen, size_t granule, unsigned half)
{
    uint64_t x = (granule * 2 + half) * 0x9e3779b97f4a7c15ULL + data_gen * 0xd1b54a32d192ed03ULL;
    return x ^ (x >> 29);
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Counts the chunk's granules whose tag, or data, is not what was written. */
static void verify(struct probe *p, size_t c)
{
    const struct chunk *k = &p->chunks[c];
    for (size_t i = 0; i < GRANULES_PER_CHUNK; i++) {
        size_t g = c * GRANULES_PER_CHUNK + i;
        uint8_t *granule = p->buf + 16 * g;
        unsigned tag = load_tag(granule);
        p->bad_tags += tag != tag_of(k->gen, g);
        const uint64_t *w = (const uint64_t *)with_tag(granule, tag); /* never faults */
        p->bad_data += w[0] != word_of(k->data_gen, g, 0) || w[1] != word_of(k->data_gen, g, 1);
    }
}

/* Writes the chunk's next generation: tags and data, or tags alone. */
static void advance(struct probe *p, size_t c, int tags_only)
{
    struct chunk *k = &p->chunks[c];
    k->gen++;
    k->data_gen += !tags_only;
    for (size_t i = 0; i < GRANULES_PER_CHUNK; i++) {
        size_t g = c * GRANULES_PER_CHUNK + i;
        uint8_t *granule = with_tag(p->buf + 16 * g, tag_of(k->gen, g));
        if (tags_only)
            store_tag(granule);
        else
            store_tag_and_pair(granule, word_of(k->data_gen, g, 0), word_of(k->data_gen, g, 1));
    }
}

/* What a load with a wrong tag does now, in a child. */
static const char *fault(struct probe *p)
{
    return wrong_tag_result(with_tag(p->buf, load_tag(p->buf) ^ 1));
}

/* The hidden self-test: a byte and a tag change the probe did not make. */
static void corrupt(struct probe *p)
{
    uint8_t *byte = p->buf + p->count / 2 * CHUNK + 5;
    with_tag(byte, load_tag(byte))[0] ^= 0x5a;
    uint8_t *granule = p->buf + p->count / 3 * CHUNK + 16 * 9;
    store_tag(with_tag(granule, load_tag(granule) ^ 1));
}

static int line_on_stdin(void)
{
    struct pollfd fd = {0, POLLIN, 0};
    if (poll(&fd, 1, 0) <= 0)
        return 0;
    char line[64];
    ssize_t n = read(0, line, sizeof line);
    return n <= 0 || memchr(line, '\n', (size_t)n) != NULL; /* a line's end, or stdin's */
}

int main(int argc, char **argv)
{
    long mib = argc > 1 ? atol(argv[1]) : 32;
    int selftest = argc > 2 && strcmp(argv[2], "selftest-corrupt") == 0;
    if (mib <= 0 || mib > 1 << 20) {
        fprintf(stderr, "MIG-PROBE-ERROR size %s\n", argv[1]);
        return 1;
    }
    struct probe p = {0};
    p.count = (size_t)mib * (1024 * 1024 / CHUNK);
    p.chunks = calloc(p.count, sizeof *p.chunks);
    p.buf = mmap(NULL, p.count * CHUNK, PROT_READ | PROT_WRITE | PROT_MTE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (!p.chunks || p.buf == MAP_FAILED || enable_mte()) {
        perror("MIG-PROBE-ERROR setup");
        return 1;
    }
    for (size_t c = 0; c < p.count; c++) {
        p.chunks[c].gen = p.chunks[c].data_gen = (uint32_t)-1;
        advance(&p, c, 0); /* generation 0 */
    }
    printf("MIG-PROBE-READY mib=%ld\n", mib);
    fflush(stdout);

    unsigned long passes = 0, tick = 0, step = 0;
    int64_t last = now_ns(), next_tick = last + TICK_NS, maxgap = 0;
    for (size_t c = 0;; step++) {
        verify(&p, c);
        advance(&p, c, (c + passes) % 3 == 2);
        if (++c == p.count) {
            c = 0;
            if (++passes == 1 && selftest)
                corrupt(&p);
        }
        int64_t now = now_ns();
        maxgap = now - last > maxgap ? now - last : maxgap;
        last = now;
        if (now >= next_tick) {
            printf("MIG-PROBE tick=%lu passes=%lu bad_data=%lu bad_tags=%lu fault=%s maxgap_ms=%lld\n",
                   ++tick, passes, p.bad_data, p.bad_tags, fault(&p),
                   (long long)(maxgap / 1000000));
            fflush(stdout);
            maxgap = 0;
            last = now_ns(); /* the line and the fork are not a gap */
            next_tick = last + TICK_NS;
        }
        if (step % POLL_EVERY == 0 && line_on_stdin())
            break;
    }
    for (size_t c = 0; c < p.count; c++)
        verify(&p, c);
    const char *last_fault = fault(&p);
    printf("MIG-PROBE-DONE passes=%lu bad_data=%lu bad_tags=%lu fault=%s\n", passes, p.bad_data,
           p.bad_tags, last_fault);
    fflush(stdout);
    return p.bad_data || p.bad_tags || strcmp(last_fault, "SEGV_MTESERR") ? 1 : 0;
}
