#include "gm_space.h"

#include <string.h>

const struct gm_space_region *gm_space_at(const struct gm_space *space, uint64_t gpa)
{
    for (size_t i = 0; i < space->nregions; i++) {
        const struct gm_space_region *r = &space->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size)
            return r;
    }
    return NULL;
}

const struct gm_space_region *gm_space_find(const struct gm_space *space, uint64_t gpa,
                                            uint64_t len)
{
    const struct gm_space_region *r = gm_space_at(space, gpa);
    return r != NULL && len <= r->size - (gpa - r->gpa) ? r : NULL;
}

static uint64_t *dirty_bits(const struct gm_space *space, size_t index)
{
    if (index >= space->nregions)
        return NULL;
    return __atomic_load_n(&space->regions[index].dirty, __ATOMIC_ACQUIRE);
}

void gm_space_mark(const struct gm_space *space, size_t index, uint64_t offset, uint64_t len)
{
    if (index < space->nregions)
        gm_space_mark_region(space, &space->regions[index], offset, len);
}

#define GPA_LOG_SHIFT 12

static void mark_gpa_log(const struct gm_gpa_log *log, uint64_t gpa, uint64_t len)
{
    uint64_t first = gpa >> GPA_LOG_SHIFT;
    uint64_t last = (gpa + len - 1) >> GPA_LOG_SHIFT;
    if (last >= log->pages)
        last = log->pages - 1;
    for (uint64_t page = first; page <= last && page < log->pages; page++)
        __atomic_fetch_or(&log->bits[page / 8], (uint8_t)(1u << (page % 8)), __ATOMIC_RELEASE);
}

void gm_space_set_gpa_log(struct gm_space *space, const struct gm_gpa_log *log)
{
    __atomic_store_n(&space->gpa_log, log, __ATOMIC_RELEASE);
}

void gm_space_mark_region(const struct gm_space *space, const struct gm_space_region *region,
                          uint64_t offset, uint64_t len)
{
    if (len == 0)
        return;
    uint64_t size = region->size;
    if (offset >= size || len > size - offset)
        return;
    const struct gm_gpa_log *log = __atomic_load_n(&space->gpa_log, __ATOMIC_ACQUIRE);
    if (log != NULL)
        mark_gpa_log(log, region->gpa + offset, len);
    uint64_t *bits = __atomic_load_n(&region->dirty, __ATOMIC_ACQUIRE);
    if (bits == NULL)
        return;
    uint64_t first = offset >> space->page_shift;
    uint64_t last = (offset + len - 1) >> space->page_shift;
    for (uint64_t w = first / 64; w <= last / 64; w++) {
        unsigned lo = w == first / 64 ? first % 64 : 0;
        unsigned hi = w == last / 64 ? last % 64 : 63;
        uint64_t mask = (hi == 63 ? ~0ULL : (1ULL << (hi + 1)) - 1) & ~((1ULL << lo) - 1);
        __atomic_fetch_or(&bits[w], mask, __ATOMIC_RELEASE);
    }
}

void gm_space_mark_pages(const struct gm_space *space, size_t index, const uint64_t *pages,
                         size_t npages)
{
    uint64_t *bits = dirty_bits(space, index);
    if (bits == NULL)
        return;
    uint64_t count = space->regions[index].size >> space->page_shift;
    for (size_t i = 0; i < npages; i++)
        if (pages[i] < count)
            __atomic_fetch_or(&bits[pages[i] / 64], 1ULL << (pages[i] % 64), __ATOMIC_RELEASE);
}

void gm_space_take(const struct gm_space *space, size_t index, uint64_t *out, size_t words)
{
    uint64_t *bits = dirty_bits(space, index);
    if (bits == NULL) {
        memset(out, 0, words * sizeof *out);
        return;
    }
    for (size_t w = 0; w < words; w++)
        out[w] = __atomic_exchange_n(&bits[w], 0, __ATOMIC_ACQ_REL);
}
