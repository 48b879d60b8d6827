/* A thread-safe pool of untagged staging buffers for the BOUNCE route. */
#ifndef GM_BOUNCE_H
#define GM_BOUNCE_H

#include <stddef.h>
#include <stdint.h>

struct gm_pool;

struct gm_pool *gm_pool_new(size_t buffer_size, size_t count);
void gm_pool_free(struct gm_pool *pool);
size_t gm_pool_buffer_size(const struct gm_pool *pool);

#endif
