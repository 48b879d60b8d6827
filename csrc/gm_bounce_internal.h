/* Internal: lending a staging buffer out of a pool and taking it back. */
#ifndef GM_BOUNCE_INTERNAL_H
#define GM_BOUNCE_INTERNAL_H

#include <stdint.h>

struct gm_pool;

uint8_t *gm_pool_take(struct gm_pool *pool);
void gm_pool_give(struct gm_pool *pool, uint8_t *buffer);

#endif
