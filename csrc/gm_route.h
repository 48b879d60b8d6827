/* Data moves between guest memory and a caller's buffer, one native loop
 * per route, over a list of spans (one per region touched). */
#ifndef GM_ROUTE_H
#define GM_ROUTE_H

#include <stddef.h>
#include <stdint.h>

#include "gm_space.h"

struct gm_pool;

enum gm_route {
    GM_ROUTE_TCO = 0,
    GM_ROUTE_MATCH_ALL = 1,
    GM_ROUTE_BOUNCE = 2,
    GM_ROUTE_UNCHECKED_THREAD = 3,
    GM_ROUTE_CHECKED = 4
};

enum gm_op {
    GM_OP_READ = 0,   /* guest -> buf */
    GM_OP_WRITE = 1,  /* buf -> guest */
    GM_OP_FILL = 2,   /* fill_byte -> guest */
    GM_OP_STAGE = 4   /* flag: buf is (tagged) guest memory: copy it through a
                       * temporary under TCO. Overlap of buf with the spans is
                       * found and staged without it. */
};

struct gm_span {
    uint64_t gpa;     /* guest physical address of the span's first byte */
    uint8_t *guest;   /* host address of the span's first byte, untagged */
    uint8_t *table;   /* SOFTWARE: tag of the granule holding guest[0] */
    size_t len;
    const struct gm_space_region *region;  /* its region in the access's space; NULL: none */
};

struct gm_fault {
    size_t span;            /* which span */
    size_t offset;          /* first byte of it in a mismatching granule */
    int logical_tag;
    int allocation_tag;
};

struct gm_access {
    int mode;
    int route;
    int op;
    const struct gm_span *spans;
    size_t nspans;
    uint8_t *buf;           /* READ/WRITE: the spans' bytes, back to back */
    int fill_byte;
    int logical_tag;        /* CHECKED */
    struct gm_pool *pool;   /* BOUNCE */
    int vm_fd;              /* KVM: the VM whose tags CHECKED compares */
    struct gm_fault fault;  /* out, on GM_ERR_TAG_CHECK */
    const struct gm_space *space;  /* a WRITE or FILL marks its spans' regions' dirty bits */
};

/* One region of a guest memory, and what that memory's accesses need: the
 * binding's fast path. Built once per region and never changed, so any
 * number of threads may use one at once. */
struct gm_hot {
    int mode;
    uint8_t *base;          /* the region's first byte, untagged; NULL: always GM_MISS */
    uint8_t *table;         /* SOFTWARE: the tag of its first granule; else NULL */
    uint64_t gpa;           /* the region's first GPA */
    uint64_t size;
    struct gm_pool *pool;   /* BOUNCE */
    const struct gm_space *space;          /* whose dirty log a write or fill marks */
    const struct gm_space_region *region;  /* this region's entry in it; NULL: none */
};

int gm_access(struct gm_access *access);
/* gm_access on [gpa, gpa + len) as one span when the range lies inside hot's
 * region and route is not CHECKED (which needs a tag and, under KVM, the VM);
 * else GM_MISS, having done nothing. buf is not tagged guest memory (no
 * GM_OP_STAGE: the caller knows), though it may overlap the range (memmove). */
int gm_hot_read(const struct gm_hot *hot, int route, uint64_t gpa, size_t len, uint8_t *buf);
int gm_hot_write(const struct gm_hot *hot, int route, uint64_t gpa, size_t len,
                 const uint8_t *buf);
int gm_hot_fill(const struct gm_hot *hot, int route, uint64_t gpa, size_t len, int byte);
/* One range of hot's region with every argument (any route, a tag, a fill
 * byte, GM_OP_STAGE, the KVM VM's fd for CHECKED); GM_MISS, having done
 * nothing, if the range is not inside the region. A write or fill marks. */
int gm_hot_move(const struct gm_hot *hot, int route, int op, uint64_t gpa, size_t len,
                uint8_t *buf, int fill_byte, int logical_tag, int vm_fd);
void gm_last_fault(struct gm_fault *out);

#endif
