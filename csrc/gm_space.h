/* A space of guest RAM regions: the one native description of a GuestMemory's
 * regions, made once and passed to every entry that walks guest addresses
 * (the virtqueue, the stream codec), with the one GPA lookup they share. */
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
};

struct gm_space {
    int mode;               /* enum gm_mode */
    int vm_fd;              /* KVM: the VM's fd (used only while the VM is held open), else -1 */
    const struct gm_space_region *regions;   /* sorted by gpa, non-overlapping */
    size_t nregions;
};

/* The region holding gpa, or NULL. */
const struct gm_space_region *gm_space_at(const struct gm_space *space, uint64_t gpa);
/* The region holding all of [gpa, gpa + len), or NULL. */
const struct gm_space_region *gm_space_find(const struct gm_space *space, uint64_t gpa,
                                            uint64_t len);

#endif
