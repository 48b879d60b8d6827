/* A space of guest RAM regions: the one native description of a GuestMemory's
 * regions, made once and passed to every entry that walks guest addresses
 * (the virtqueue, the stream codec), with the one GPA lookup they share, and
 * the dirty log's bitmaps, which native writers mark themselves. */
#ifndef GM_SPACE_H
#define GM_SPACE_H

#include <stddef.h>
#include <stdint.h>

/* One region: where it is to the guest and to the VMM. */
struct gm_space_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *base;          /* the VMM's address of the region's first byte; NULL: validate only */
    uint8_t *table;         /* SOFTWARE tag table (one byte a granule), or NULL */
    uint64_t *dirty;        /* one bit a host page, set atomically; NULL: the log is off */
};

/* A bitmap over guest physical addresses, shared with another process (the
 * vhost-user dirty log): bit i % 8 of byte i / 8 covers the 4 KiB page at GPA
 * i * 4096, whatever the host page. Bits are set with atomic byte ORs. */
struct gm_gpa_log {
    uint8_t *bits;
    uint64_t pages;         /* pages the bitmap covers; marks past them are dropped */
};

struct gm_space {
    int mode;               /* enum gm_mode */
    int vm_fd;              /* KVM: the VM's fd (used only while the VM is held open), else -1 */
    unsigned page_shift;    /* log2 of the dirty log's page (the host page) */
    const struct gm_space_region *regions;   /* sorted by gpa, non-overlapping */
    size_t nregions;
    const struct gm_gpa_log *gpa_log;   /* also marked with every dirty mark, or NULL */
};

/* The region holding gpa, or NULL. */
const struct gm_space_region *gm_space_at(const struct gm_space *space, uint64_t gpa);
/* The region holding all of [gpa, gpa + len), or NULL. */
const struct gm_space_region *gm_space_find(const struct gm_space *space, uint64_t gpa,
                                            uint64_t len);

/* Mark the pages of [offset, offset + len) of region `index` dirty (no-op while
 * the log is off or outside the region), and their 4 KiB pages in the space's
 * GPA log when it has one. Writers call it after they wrote. */
void gm_space_mark(const struct gm_space *space, size_t index, uint64_t offset, uint64_t len);
/* gm_space_mark for a region of the space known by its entry. */
void gm_space_mark_region(const struct gm_space *space, const struct gm_space_region *region,
                          uint64_t offset, uint64_t len);
/* Mark pages (numbers from the region's first page) of region `index` dirty. */
void gm_space_mark_pages(const struct gm_space *space, size_t index, const uint64_t *pages,
                         size_t npages);
/* Point the space's GPA log at `log` (NULL: none), atomically for writers. */
void gm_space_set_gpa_log(struct gm_space *space, const struct gm_gpa_log *log);
/* Move region `index`'s dirty words into out[0..words) and clear them, each
 * word in one atomic exchange: a page marked meanwhile is taken now or next. */
void gm_space_take(const struct gm_space *space, size_t index, uint64_t *out, size_t words);

#endif
