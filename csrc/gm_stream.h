/* The migration stream's page records (docs/stream-format.md), encoded and
 * decoded in native loops: data and tags of many pages per call. */
#ifndef GM_STREAM_H
#define GM_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "gm_space.h"

enum gm_stream_const {
    GM_REC_PAGE = 1,
    GM_REC_ROUND = 2,
    GM_REC_END = 3,
    GM_PAGE_ZERO_DATA = 1,
    GM_PAGE_ZERO_TAGS = 2,
    GM_REC_HEAD = 8,        /* type, flags, 48-bit page frame or counter */
    GM_REC_SUM = 8,         /* checksum after each record */
    GM_STREAM_PAGE = 4096,
    GM_STREAM_TAG_BYTES = 128
};

enum gm_stream_error {
    GM_STREAM_NEED_MORE = 1,     /* not an error: the record is not all here yet */
    GM_STREAM_BAD_TYPE = -10,
    GM_STREAM_BAD_FLAGS = -11,
    GM_STREAM_BAD_CHECKSUM = -12,
    GM_STREAM_OUT_OF_REGION = -13,
    GM_STREAM_TAGS_UNSUPPORTED = -14,
    GM_STREAM_TAGS_FROM_UNTAGGED = -15  /* tags in a stream whose source had none */
};

uint64_t gm_checksum(const uint8_t *data, size_t len);
/* Encode the pages pfns[0..npfns) of region `index` of the space; KVM tags
 * come through the space's vm_fd. A region whose base is NULL only validates:
 * decoding checks every record against it and applies nothing (what
 * `guestmem inspect` does). */
int gm_stream_encode(const struct gm_space *space, size_t index, const uint64_t *pfns,
                     size_t npfns, uint8_t *out, size_t out_cap, size_t *done, size_t *written);
int gm_stream_decode(const struct gm_space *space, int source_tagged, const uint8_t *in,
                     size_t in_len, size_t *consumed, uint64_t *pages, int *record_type, uint64_t *record_value);

#endif
