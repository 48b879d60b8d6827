/* Guest RAM mappings: anonymous or memfd-backed, with PROT_MTE on request. */
#ifndef GM_MAP_H
#define GM_MAP_H

#include <stddef.h>
#include <stdint.h>

struct gm_mapping {
    uint8_t *addr;
    size_t size;
    int fd;          /* memfd, or -1 for anonymous memory */
    int mte;         /* mapped with PROT_MTE */
};

struct gm_mapping *gm_map_anonymous(size_t size, int mte);
struct gm_mapping *gm_map_memfd(const char *name, size_t size, int mte);
struct gm_mapping *gm_map_fd(int fd, size_t size, int mte);
/* A shared mapping of `size` bytes of fd from `offset` (a multiple of the host page). */
struct gm_mapping *gm_map_fd_at(int fd, size_t size, int mte, uint64_t offset);
void gm_mapping_free(struct gm_mapping *mapping);
int gm_mapping_keeps_tags(struct gm_mapping *mapping);

#endif
