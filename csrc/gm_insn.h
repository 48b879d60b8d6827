/* The MTE instructions user space has (internal: not part of the binding).
 * Every caller checks gm_cpu_has_mte() first: without FEAT_MTE they are
 * UNDEFINED, and on other architectures they do not exist. */
#ifndef GM_INSN_H
#define GM_INSN_H

#include <stdint.h>

#define GM_GRANULE 16u
#define GM_TAG_SHIFT 56
#define GM_ADDR_MASK ((UINT64_C(1) << GM_TAG_SHIFT) - 1)

static inline uint8_t *gm_with_tag(const void *p, unsigned tag)
{
    uint64_t a = ((uint64_t)(uintptr_t)p & GM_ADDR_MASK) | ((uint64_t)tag << GM_TAG_SHIFT);
    return (uint8_t *)(uintptr_t)a;
}

#if defined(__aarch64__)
#define GM_HAVE_MTE_INSN 1
/* Lets the assembler accept MTE instructions; the compiler still emits only
 * armv8.0 code, and only these instructions need FEAT_MTE at run time. */
#define GM_MEMTAG ".arch armv8.5-a+memtag\n\t"

static inline int gm_tco_get(void)
{
    uint64_t v;
    __asm__ volatile(GM_MEMTAG "mrs %0, tco" : "=r"(v));
    return v != 0;
}

static inline void gm_tco_set(int on)
{
    if (on)
        __asm__ volatile(GM_MEMTAG "msr tco, #1" ::: "memory");
    else
        __asm__ volatile(GM_MEMTAG "msr tco, #0" ::: "memory");
}

static inline unsigned gm_ldg(const void *p)
{
    uint64_t a = (uint64_t)(uintptr_t)p;
    __asm__ volatile(GM_MEMTAG "ldg %0, [%0]" : "+r"(a) : : "memory");
    return (unsigned)(a >> GM_TAG_SHIFT) & 0xf;
}

static inline void gm_stg(void *p, unsigned tag)
{
    uint8_t *a = gm_with_tag(p, tag);
    __asm__ volatile(GM_MEMTAG "stg %0, [%0]" : : "r"(a) : "memory");
}

#else
#define GM_HAVE_MTE_INSN 0
static inline int gm_tco_get(void) { return 0; }
static inline void gm_tco_set(int on) { (void)on; }
static inline unsigned gm_ldg(const void *p) { (void)p; return 0; }
static inline void gm_stg(void *p, unsigned tag) { (void)p; (void)tag; }
#endif

#endif
