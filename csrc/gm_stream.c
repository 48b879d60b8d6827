#include "gm_stream.h"

#include <errno.h>
#include <string.h>

#include "gm_insn.h"
#include "gm_kvm.h"
#include "gm_platform.h"
#include "gm_status.h"

#define PAGE GM_STREAM_PAGE
#define GRANULES (GM_STREAM_PAGE / 16)
#define PAGE_RECORD_MAX (GM_REC_HEAD + GM_STREAM_PAGE + GM_STREAM_TAG_BYTES + GM_REC_SUM)

static const uint64_t PRIME1 = 0x9E3779B185EBCA87ULL;
static const uint64_t PRIME2 = 0xC2B2AE3D27D4EB4FULL;

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, sizeof v);
}

static inline uint64_t rotl(uint64_t v, int r)
{
    return (v << r) | (v >> (64 - r));
}

/* Four independent multiply-xor lanes over 8-byte words: every step is a
 * bijection of the lane, so any change to one word changes the result. */
uint64_t gm_checksum(const uint8_t *data, size_t len)
{
    uint64_t a = PRIME1, b = PRIME2, c = PRIME1 ^ PRIME2, d = ~PRIME1;
    size_t i = 0;
    for (; i + 32 <= len; i += 32) {
        a = (a ^ load64(data + i)) * PRIME1;
        b = (b ^ load64(data + i + 8)) * PRIME1;
        c = (c ^ load64(data + i + 16)) * PRIME1;
        d = (d ^ load64(data + i + 24)) * PRIME1;
    }
    uint64_t h = a ^ rotl(b, 16) ^ rotl(c, 32) ^ rotl(d, 48);
    for (; i + 8 <= len; i += 8)
        h = (h ^ load64(data + i)) * PRIME2;
    for (; i < len; i++)
        h = (h ^ data[i]) * PRIME1;
    h ^= (uint64_t)len * PRIME2;
    h ^= h >> 33;
    h *= PRIME1;
    h ^= h >> 29;
    return h;
}

static int all_zero(const uint8_t *p, size_t n)
{
    uint64_t acc = 0;
    for (size_t i = 0; i < n; i += 8)
        acc |= load64(p + i);
    return acc == 0;
}

static void head(uint8_t *out, int type, int flags, uint64_t value)
{
    store64(out, (uint64_t)type | ((uint64_t)flags << 8) | (value << 16));
}

/* ---- one page's tags, in any tag source ----------------------------------- */

static int read_tags(const struct gm_space *s, const struct gm_space_region *r, uint64_t offset,
                     uint8_t tags[GRANULES])
{
    switch (s->mode) {
    case GM_MODE_HARDWARE:
        for (size_t g = 0; g < GRANULES; g++)
            tags[g] = (uint8_t)gm_ldg(r->base + offset + g * 16);
        return GM_OK;
    case GM_MODE_SOFTWARE:
        memcpy(tags, r->table + offset / 16, GRANULES);
        return GM_OK;
    case GM_MODE_KVM:
        return gm_kvm_tags_get(s->vm_fd, r->gpa + offset, GRANULES, tags);
    default:
        memset(tags, 0, GRANULES);
        return GM_OK;
    }
}

static int write_tags(const struct gm_space *s, const struct gm_space_region *r, uint64_t offset,
                      const uint8_t tags[GRANULES], int zero)
{
    switch (s->mode) {
    case GM_MODE_HARDWARE:
        for (size_t g = 0; g < GRANULES; g++)
            gm_stg(r->base + offset + g * 16, zero ? 0 : tags[g]);
        return GM_OK;
    case GM_MODE_SOFTWARE:
        if (zero)
            memset(r->table + offset / 16, 0, GRANULES);
        else
            memcpy(r->table + offset / 16, tags, GRANULES);
        return GM_OK;
    case GM_MODE_KVM:
        return gm_kvm_tags_set(s->vm_fd, r->gpa + offset, GRANULES, zero ? NULL : tags, 0);
    default:
        return zero ? GM_OK : GM_STREAM_TAGS_UNSUPPORTED;
    }
}

/* Copy a page out of guest memory and say whether it was all zero, in one
 * pass; under TCO where the mapping is tagged (the tags travel apart). */
static int copy_out_is_zero(int mode, uint8_t *dst, const uint8_t *src)
{
    int hardware = mode == GM_MODE_HARDWARE;
    int saved = hardware ? gm_tco_get() : 0;
    uint64_t acc = 0;
    if (hardware)
        gm_tco_set(1);
    for (size_t i = 0; i < PAGE; i += 8) {
        uint64_t word = load64(src + i);
        store64(dst + i, word);
        acc |= word;
    }
    if (hardware)
        gm_tco_set(saved);
    return acc == 0;
}

/* Data moves under TCO where the mapping is tagged: the tags travel apart. */
static void copy_data(int mode, uint8_t *dst, const uint8_t *src, int zero)
{
    int hardware = mode == GM_MODE_HARDWARE;
    int saved = hardware ? gm_tco_get() : 0;
    if (hardware)
        gm_tco_set(1);
    if (zero)
        memset(dst, 0, PAGE);
    else
        memcpy(dst, src, PAGE);
    if (hardware)
        gm_tco_set(saved);
}

/* ---- encode ------------------------------------------------------------------ */

int gm_stream_encode(const struct gm_space *space, size_t index, const uint64_t *pfns,
                     size_t npfns, uint8_t *out, size_t out_cap, size_t *done, size_t *written)
{
    uint8_t tags[GRANULES];
    size_t at = 0, i = 0;
    *done = *written = 0;
    if (index >= space->nregions || space->regions[index].base == NULL) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    const struct gm_space_region *r = &space->regions[index];
    if (space->mode == GM_MODE_HARDWARE && gm_thread_enable_mte() != GM_OK)
        return GM_ERR_ERRNO;
    for (; i < npfns && out_cap - at >= PAGE_RECORD_MAX; i++) {
        uint64_t gpa = pfns[i] * PAGE;
        if (gpa < r->gpa || gpa + PAGE > r->gpa + r->size) {
            errno = EINVAL;
            *done = i;
            *written = at;
            return GM_ERR_ERRNO;
        }
        uint64_t offset = gpa - r->gpa;
        uint8_t *rec = out + at;
        uint8_t *p = rec + GM_REC_HEAD;
        int flags = 0;
        if (copy_out_is_zero(space->mode, p, r->base + offset))
            flags |= GM_PAGE_ZERO_DATA;
        else
            p += PAGE;
        int status = read_tags(space, r, offset, tags);
        if (status != GM_OK) {
            *done = i;
            *written = at;
            return status;
        }
        if (all_zero(tags, GRANULES)) {
            flags |= GM_PAGE_ZERO_TAGS;
        } else {
            for (size_t g = 0; g < GRANULES; g += 2)
                *p++ = (uint8_t)(tags[g] | (tags[g + 1] << 4));
        }
        head(rec, GM_REC_PAGE, flags, pfns[i]);
        store64(p, gm_checksum(rec, (size_t)(p - rec)));
        at = (size_t)(p + GM_REC_SUM - out);
    }
    *done = i;
    *written = at;
    return GM_OK;
}

/* ---- decode ------------------------------------------------------------------ */

static size_t page_record_size(int flags)
{
    return GM_REC_HEAD + (flags & GM_PAGE_ZERO_DATA ? 0 : PAGE) +
           (flags & GM_PAGE_ZERO_TAGS ? 0 : GM_STREAM_TAG_BYTES) + GM_REC_SUM;
}

int gm_stream_decode(const struct gm_space *space, int source_tagged, const uint8_t *in,
                     size_t in_len, size_t *consumed, uint64_t *pages, int *record_type,
                     uint64_t *record_value)
{
    uint8_t tags[GRANULES];
    size_t at = 0;
    *record_type = 0;
    if (space->nregions > 0 && space->mode == GM_MODE_HARDWARE && gm_thread_enable_mte() != GM_OK)
        return GM_ERR_ERRNO;
    for (;;) {
        *consumed = at;
        if (in_len - at < GM_REC_HEAD)
            return GM_STREAM_NEED_MORE;
        const uint8_t *rec = in + at;
        uint64_t word = load64(rec);
        int type = (int)(word & 0xff), flags = (int)((word >> 8) & 0xff);
        uint64_t value = word >> 16;
        size_t size;
        if (type == GM_REC_PAGE) {
            if (flags & ~(GM_PAGE_ZERO_DATA | GM_PAGE_ZERO_TAGS))
                return GM_STREAM_BAD_FLAGS;
            size = page_record_size(flags);
        } else if (type == GM_REC_ROUND || type == GM_REC_END) {
            if (flags != 0)
                return GM_STREAM_BAD_FLAGS;
            size = GM_REC_HEAD + GM_REC_SUM;
        } else {
            return GM_STREAM_BAD_TYPE;
        }
        if (in_len - at < size)
            return GM_STREAM_NEED_MORE;
        if (gm_checksum(rec, size - GM_REC_SUM) != load64(rec + size - GM_REC_SUM))
            return GM_STREAM_BAD_CHECKSUM;
        if (type != GM_REC_PAGE) {
            *record_type = type;
            *record_value = value;
            *consumed = at + size;
            return GM_OK;
        }
        if (value > UINT64_MAX / PAGE)
            return GM_STREAM_OUT_OF_REGION;
        uint64_t gpa = value * PAGE;
        const struct gm_space_region *r = gm_space_find(space, gpa, PAGE);
        if (r == NULL)
            return GM_STREAM_OUT_OF_REGION;
        int zero_tags = (flags & GM_PAGE_ZERO_TAGS) != 0;
        if (!zero_tags && !source_tagged)
            return GM_STREAM_TAGS_FROM_UNTAGGED;
        if (r->base == NULL) {  /* validating only */
            ++*pages;
            at += size;
            continue;
        }
        const uint8_t *p = rec + GM_REC_HEAD;
        const uint8_t *data = p;
        if (!(flags & GM_PAGE_ZERO_DATA))
            p += PAGE;
        if (!zero_tags)
            for (size_t g = 0; g < GRANULES; g += 2) {
                tags[g] = p[g / 2] & 0xf;
                tags[g + 1] = p[g / 2] >> 4;
            }
        int status = write_tags(space, r, gpa - r->gpa, tags, zero_tags);
        if (status != GM_OK)
            return status;
        copy_data(space->mode, r->base + (gpa - r->gpa), data, flags & GM_PAGE_ZERO_DATA);
        gm_space_mark_region(space, r, gpa - r->gpa, PAGE);
        ++*pages;
        at += size;
    }
}
