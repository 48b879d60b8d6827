#include "gm_space.h"

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
