/* The split virtqueue of virtio 1.x over guest RAM: the device's half of the
 * ring walk. One call pops a whole descriptor chain (direct and one level of
 * indirect descriptors), one call pushes a used element and says whether the
 * driver wants an interrupt. A malformed ring is an error code with the
 * offending index, never a fault or an endless walk; after one the queue
 * refuses everything until it is reset. Under HARDWARE the rings are read
 * and written with PSTATE.TCO set (restored on every path): they are plain
 * loads and stores, no system call in between. */
#ifndef GM_VIRTQ_H
#define GM_VIRTQ_H

#include <stddef.h>
#include <stdint.h>

#include "gm_space.h"

enum gm_virtq_limits {
    GM_VIRTQ_MAX_SIZE = 32768,
    GM_VIRTQ_HEADER = 4      /* words before the ranges in the output array */
};

enum gm_virtq_flags {
    GM_VIRTQ_DESC_F_NEXT = 1,
    GM_VIRTQ_DESC_F_WRITE = 2,
    GM_VIRTQ_DESC_F_INDIRECT = 4,
    GM_VIRTQ_AVAIL_F_NO_INTERRUPT = 1
};

/* What was wrong with the ring (gm_virtq.error after GM_ERR_VIRTQ). */
enum gm_virtq_error {
    GM_VQ_OK = 0,
    GM_VQ_NEEDS_RESET = 1,        /* an earlier error: reset first */
    GM_VQ_AVAIL_AHEAD = 2,        /* avail idx more than size ahead (index: the idx) */
    GM_VQ_HEAD_RANGE = 3,         /* avail ring entry >= size (index: the entry) */
    GM_VQ_DESC_RANGE = 4,         /* a next index outside its table (index: it) */
    GM_VQ_CHAIN_LONG = 5,         /* more than size descriptors: a loop (index: last) */
    GM_VQ_BUFFER_RANGE = 6,       /* a buffer outside guest RAM (index, gpa) */
    GM_VQ_INDIRECT_LEN = 7,       /* an indirect table of 0 or not n*16 bytes */
    GM_VQ_INDIRECT_RANGE = 8,     /* an indirect table not inside one region */
    GM_VQ_INDIRECT_NESTED = 9,    /* INDIRECT inside an indirect table */
    GM_VQ_INDIRECT_NEXT = 10,     /* INDIRECT and NEXT on one descriptor */
    GM_VQ_READ_AFTER_WRITE = 11,  /* a readable descriptor after a writable one */
    GM_VQ_USED_ID = 12,           /* push of an id >= size (the caller's error) */
    GM_VQ_RING_RANGE = 13,        /* a ring not inside one region, or misaligned */
    GM_VQ_SIZE = 14               /* size not a power of two in 1..32768 */
};

struct gm_virtq {
    /* set by the caller before gm_virtq_init */
    const struct gm_space *space;   /* guest RAM: its regions and tag mode */
    uint32_t size;
    int event_idx;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    /* out of each pop: [head, readable count, readable bytes, writable bytes],
     * then (gpa, len) pairs, readable ones first; 4 + 2 * size words */
    uint64_t *out;
    /* the device's state */
    uint8_t *desc, *avail, *used;
    const struct gm_space_region *used_region;   /* marked dirty by each push */
    uint16_t last_avail;
    uint16_t used_idx;
    int error;            /* enum gm_virtq_error; nonzero: needs reset */
    uint32_t error_index;
    uint64_t error_gpa;
};

/* Check the size and the rings' places; GM_OK or GM_ERR_VIRTQ. Also resets. */
int gm_virtq_init(struct gm_virtq *q);
/* Forget the indices and the error, as a device reset does. */
void gm_virtq_reset(struct gm_virtq *q);
/* The number of descriptors of the chain popped into q->out (>= 1), 0 if the
 * ring is empty, or GM_ERR_VIRTQ. */
int gm_virtq_pop(struct gm_virtq *q);
/* Publish (id, len) in the used ring: 1 if the driver must be notified, 0 if
 * not, or GM_ERR_VIRTQ. */
int gm_virtq_push(struct gm_virtq *q, uint32_t id, uint32_t len);

#endif
