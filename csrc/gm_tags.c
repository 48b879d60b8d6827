#include "gm_tags.h"

#include <errno.h>
#include <string.h>

#include "gm_insn.h"
#include "gm_kvm.h"
#include "gm_space.h"
#include "gm_status.h"

int gm_tags_get(int mode, const uint8_t *guest, const uint8_t *table,
                size_t granules, uint8_t *out)
{
    switch (mode) {
    case GM_MODE_HARDWARE:
        for (size_t g = 0; g < granules; g++)
            out[g] = (uint8_t)gm_ldg(guest + g * GM_GRANULE);
        return GM_OK;
    case GM_MODE_SOFTWARE:
        memcpy(out, table, granules);
        return GM_OK;
    case GM_MODE_NONE:
        memset(out, 0, granules);
        return GM_OK;
    }
    errno = EINVAL;
    return GM_ERR_ERRNO;
}

int gm_tags_set(int mode, uint8_t *guest, uint8_t *table, size_t granules,
                const uint8_t *tags, int uniform_tag)
{
    switch (mode) {
    case GM_MODE_HARDWARE:
        for (size_t g = 0; g < granules; g++)
            gm_stg(guest + g * GM_GRANULE, tags ? tags[g] : (unsigned)uniform_tag);
        return GM_OK;
    case GM_MODE_SOFTWARE:
        if (tags)
            memcpy(table, tags, granules);
        else
            memset(table, uniform_tag, granules);
        return GM_OK;
    case GM_MODE_NONE:
        return GM_ERR_UNSUPPORTED;
    }
    errno = EINVAL;
    return GM_ERR_ERRNO;
}

/* The region of space holding all of [gpa, gpa + granules * 16), with its
 * mapping (a validating space has none), or NULL with errno EINVAL. */
static const struct gm_space_region *region_of(const struct gm_space *space, uint64_t gpa,
                                               size_t granules)
{
    const struct gm_space_region *r = NULL;
    if (granules <= UINT64_MAX / GM_GRANULE)
        r = gm_space_find(space, gpa, granules * GM_GRANULE);
    if (r == NULL || r->base == NULL) {
        errno = EINVAL;
        return NULL;
    }
    return r;
}

static uint8_t *table_at(const struct gm_space_region *r, uint64_t offset)
{
    return r->table ? r->table + offset / GM_GRANULE : NULL;
}

int gm_space_tags_get(const struct gm_space *space, uint64_t gpa, size_t granules, uint8_t *out)
{
    const struct gm_space_region *r = region_of(space, gpa, granules);
    if (r == NULL)
        return GM_ERR_ERRNO;
    if (space->mode == GM_MODE_KVM)
        return gm_kvm_tags_get(space->vm_fd, gpa, granules, out);
    uint64_t offset = gpa - r->gpa;
    return gm_tags_get(space->mode, r->base + offset, table_at(r, offset), granules, out);
}

int gm_space_tags_set(const struct gm_space *space, uint64_t gpa, size_t granules,
                      const uint8_t *tags, int uniform_tag)
{
    const struct gm_space_region *r = region_of(space, gpa, granules);
    if (r == NULL)
        return GM_ERR_ERRNO;
    uint64_t offset = gpa - r->gpa;
    int status = space->mode == GM_MODE_KVM
        ? gm_kvm_tags_set(space->vm_fd, gpa, granules, tags, uniform_tag)
        : gm_tags_set(space->mode, r->base + offset, table_at(r, offset), granules, tags,
                      uniform_tag);
    if (status == GM_OK)
        gm_space_mark_region(space, r, offset, granules * GM_GRANULE);
    return status;
}
