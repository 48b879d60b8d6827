#include "gm_tags.h"

#include <errno.h>
#include <string.h>

#include "gm_insn.h"
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
