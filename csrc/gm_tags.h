/* Allocation tags of guest granules: LDG/STG under HARDWARE, a side table
 * (one byte per granule) under SOFTWARE, all zero under NONE. */
#ifndef GM_TAGS_H
#define GM_TAGS_H

#include <stddef.h>
#include <stdint.h>

#include "gm_space.h"

int gm_tags_get(int mode, const uint8_t *guest, const uint8_t *table,
                size_t granules, uint8_t *out);
int gm_tags_set(int mode, uint8_t *guest, uint8_t *table, size_t granules,
                const uint8_t *tags, int uniform_tag);

/* The tags of [gpa, gpa + granules * 16), which must lie in one region of
 * space (errno EINVAL otherwise), in the space's mode (KVM: through the VM's
 * fd, so hold the VM open). Setting them marks their pages dirty. */
int gm_space_tags_get(const struct gm_space *space, uint64_t gpa, size_t granules, uint8_t *out);
int gm_space_tags_set(const struct gm_space *space, uint64_t gpa, size_t granules,
                      const uint8_t *tags, int uniform_tag);

#endif
