#define _GNU_SOURCE
#include "gm_virtq.h"

#include <endian.h>
#include <string.h>

#include "gm_insn.h"
#include "gm_status.h"

/* Ring layout (virtio 1.x, 2.7): offsets in bytes. */
#define DESC_SIZE 16u
#define AVAIL_IDX 2u
#define AVAIL_RING 4u
#define USED_IDX 2u
#define USED_RING 4u
#define USED_ELEM 8u

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static inline uint16_t load16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return le16toh(v);
}

static inline void store16(uint8_t *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, sizeof v);
}

static inline struct desc load_desc(const uint8_t *table, uint32_t i)
{
    struct desc d;
    memcpy(&d, table + (size_t)i * DESC_SIZE, sizeof d);
    d.addr = le64toh(d.addr);
    d.len = le32toh(d.len);
    d.flags = le16toh(d.flags);
    d.next = le16toh(d.next);
    return d;
}

static int fail(struct gm_virtq *q, int error, uint32_t index, uint64_t gpa)
{
    q->error = error;
    q->error_index = index;
    q->error_gpa = gpa;
    return GM_ERR_VIRTQ;
}

/* Whether [gpa, gpa + len) is guest RAM, across adjacent regions too. */
static int in_ram(const struct gm_virtq *q, uint64_t gpa, uint64_t len)
{
    while (len > 0) {
        const struct gm_space_region *r = gm_space_at(q->space, gpa);
        if (r == NULL)
            return 0;
        uint64_t room = r->size - (gpa - r->gpa);
        if (len <= room)
            return 1;
        gpa += room;
        len -= room;
    }
    return 1;
}

static uint8_t *host(const struct gm_virtq *q, uint64_t gpa, uint64_t len)
{
    const struct gm_space_region *r = gm_space_find(q->space, gpa, len);
    return r ? r->base + (gpa - r->gpa) : NULL;
}

int gm_virtq_init(struct gm_virtq *q)
{
    gm_virtq_reset(q);
    q->desc = q->avail = q->used = NULL;
    q->used_region = NULL;
    uint32_t n = q->size;
    if (n == 0 || n > GM_VIRTQ_MAX_SIZE || (n & (n - 1)) != 0)
        return fail(q, GM_VQ_SIZE, n, 0);
    const struct { uint64_t gpa; uint64_t len; uint64_t align; uint8_t **out; } rings[3] = {
        { q->desc_gpa, (uint64_t)n * DESC_SIZE, 16, &q->desc },
        { q->avail_gpa, AVAIL_RING + 2ull * n + 2, 2, &q->avail },
        { q->used_gpa, USED_RING + (uint64_t)USED_ELEM * n + 2, 4, &q->used },
    };
    for (unsigned i = 0; i < 3; i++) {
        uint8_t *p = rings[i].gpa % rings[i].align ? NULL : host(q, rings[i].gpa, rings[i].len);
        if (p == NULL)
            return fail(q, GM_VQ_RING_RANGE, i, rings[i].gpa);
        *rings[i].out = p;
    }
    q->used_region = gm_space_find(q->space, q->used_gpa, rings[2].len);
    return GM_OK;
}

void gm_virtq_reset(struct gm_virtq *q)
{
    q->last_avail = 0;
    q->used_idx = 0;
    q->error = GM_VQ_OK;
    q->error_index = 0;
    q->error_gpa = 0;
}

/* Avail idx, and (acquire) the ring entries and descriptors it publishes. */
static inline uint16_t load_avail_idx(const struct gm_virtq *q)
{
    return le16toh(__atomic_load_n((uint16_t *)(q->avail + AVAIL_IDX), __ATOMIC_ACQUIRE));
}

/* The walk itself, rings already reachable (TCO set under HARDWARE). */
static int pop(struct gm_virtq *q)
{
    const uint32_t size = q->size;
    uint16_t avail_idx = load_avail_idx(q);
    if (avail_idx == q->last_avail && q->event_idx) {
        /* Ask for a kick at the next entry, then look again: the driver may
         * have added one after our load and read avail_event before our store. */
        store16(q->used + USED_RING + USED_ELEM * size, q->last_avail);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        avail_idx = load_avail_idx(q);
    }
    uint16_t pending = (uint16_t)(avail_idx - q->last_avail);
    if (pending > size)
        return fail(q, GM_VQ_AVAIL_AHEAD, avail_idx, q->avail_gpa + AVAIL_IDX);
    if (pending == 0)
        return 0;
    uint32_t slot = q->last_avail & (size - 1);
    uint32_t head = load16(q->avail + AVAIL_RING + 2 * slot);
    if (head >= size)
        return fail(q, GM_VQ_HEAD_RANGE, head, q->avail_gpa + AVAIL_RING + 2 * slot);

    uint64_t *out = q->out;
    uint64_t *range = out + GM_VIRTQ_HEADER;
    uint64_t read_len = 0, write_len = 0;
    uint32_t nread = 0, count = 0;
    const uint8_t *table = q->desc;
    uint64_t table_gpa = q->desc_gpa;
    uint32_t entries = size, i = head;
    int indirect = 0;
    for (;;) {
        if (i >= entries)
            return fail(q, GM_VQ_DESC_RANGE, i, table_gpa);
        struct desc d = load_desc(table, i);
        uint64_t at = table_gpa + (uint64_t)i * DESC_SIZE;
        if (d.flags & GM_VIRTQ_DESC_F_INDIRECT) {
            if (indirect)
                return fail(q, GM_VQ_INDIRECT_NESTED, i, at);
            if (d.flags & GM_VIRTQ_DESC_F_NEXT)
                return fail(q, GM_VQ_INDIRECT_NEXT, i, at);
            if (d.len == 0 || d.len % DESC_SIZE != 0)
                return fail(q, GM_VQ_INDIRECT_LEN, i, d.addr);
            const uint8_t *t = host(q, d.addr, d.len);
            if (t == NULL)
                return fail(q, GM_VQ_INDIRECT_RANGE, i, d.addr);
            table = t;
            table_gpa = d.addr;
            entries = d.len / DESC_SIZE;
            indirect = 1;
            i = 0;
            continue;
        }
        if (++count > size)
            return fail(q, GM_VQ_CHAIN_LONG, i, at);
        if (d.len > 0 && (d.addr + d.len < d.addr || !in_ram(q, d.addr, d.len)))
            return fail(q, GM_VQ_BUFFER_RANGE, i, d.addr);
        if (d.flags & GM_VIRTQ_DESC_F_WRITE) {
            write_len += d.len;
        } else {
            if (count - 1 > nread)
                return fail(q, GM_VQ_READ_AFTER_WRITE, i, at);
            read_len += d.len;
            nread++;
        }
        *range++ = d.addr;
        *range++ = d.len;
        if (!(d.flags & GM_VIRTQ_DESC_F_NEXT))
            break;
        i = d.next;
    }
    out[0] = head;
    out[1] = nread;
    out[2] = read_len;
    out[3] = write_len;
    q->last_avail++;
    if (q->event_idx)
        store16(q->used + USED_RING + USED_ELEM * size, q->last_avail);
    return (int)count;
}

static int push(struct gm_virtq *q, uint32_t id, uint32_t len)
{
    const uint32_t size = q->size;
    uint16_t old = q->used_idx, now = (uint16_t)(old + 1);
    uint8_t *elem = q->used + USED_RING + USED_ELEM * (old & (size - 1));
    uint32_t le[2] = { htole32(id), htole32(len) };
    memcpy(elem, le, sizeof le);
    __atomic_store_n((uint16_t *)(q->used + USED_IDX), htole16(now), __ATOMIC_RELEASE);
    q->used_idx = now;
    /* The driver reads our idx then its event; we write idx then read its event. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (q->event_idx) {
        uint16_t event = load16(q->avail + AVAIL_RING + 2 * size);
        return (uint16_t)(now - event - 1) < (uint16_t)(now - old);
    }
    return !(load16(q->avail) & GM_VIRTQ_AVAIL_F_NO_INTERRUPT);
}

/* The used ring is guest memory the device writes: its pages go in the dirty log. */
static void mark_used(const struct gm_virtq *q)
{
    const struct gm_space_region *r = q->used_region;
    gm_space_mark_region(q->space, r, q->used_gpa - r->gpa,
                         USED_RING + (uint64_t)USED_ELEM * q->size + 2);
}

/* Ring accesses are loads and stores to memory the guest may have tagged:
 * under HARDWARE they run with TCO set, and TCO is put back on every path. */
int gm_virtq_pop(struct gm_virtq *q)
{
    if (q->error != GM_VQ_OK || q->desc == NULL) {
        if (q->error == GM_VQ_OK)
            q->error = GM_VQ_NEEDS_RESET;
        return GM_ERR_VIRTQ;
    }
    int status;
    if (q->space->mode != GM_MODE_HARDWARE) {
        status = pop(q);
    } else {
        int saved = gm_tco_get();
        gm_tco_set(1);
        status = pop(q);
        gm_tco_set(saved);
    }
    if (status >= 0 && q->event_idx)
        mark_used(q); /* the avail event */
    return status;
}

int gm_virtq_push(struct gm_virtq *q, uint32_t id, uint32_t len)
{
    if (q->error != GM_VQ_OK || q->desc == NULL) {
        if (q->error == GM_VQ_OK)
            q->error = GM_VQ_NEEDS_RESET;
        return GM_ERR_VIRTQ;
    }
    if (id >= q->size) {
        q->error_index = id;
        return GM_ERR_VIRTQ; /* the caller's mistake: the queue stays usable */
    }
    int status;
    if (q->space->mode != GM_MODE_HARDWARE) {
        status = push(q, id, len);
    } else {
        int saved = gm_tco_get();
        gm_tco_set(1);
        status = push(q, id, len);
        gm_tco_set(saved);
    }
    if (status >= 0)
        mark_used(q);
    return status;
}
