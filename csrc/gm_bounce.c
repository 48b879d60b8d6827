#include "gm_bounce.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "gm_bounce_internal.h"

struct gm_pool {
    pthread_mutex_t lock;
    pthread_cond_t returned;
    size_t buffer_size;
    size_t count;
    size_t free_count;
    uint8_t **free_list;
    uint8_t *arena;          /* count * buffer_size bytes, mapped without PROT_MTE */
    struct gm_pool *next;    /* in the list of live pools, for fork() */
};

/* Every live pool, so that fork() can hand the child pools that are whole:
 * the threads holding buffers (or the lock) in the parent do not exist in
 * the child, which would otherwise wait for them for ever. */
static pthread_mutex_t gm_pools_lock = PTHREAD_MUTEX_INITIALIZER;
static struct gm_pool *gm_pools;
static pthread_once_t gm_pools_once = PTHREAD_ONCE_INIT;

/* Before fork: hold every pool still, so the child copies each one in a
 * consistent state. The order (list, then each pool) is the only place two
 * of these locks are held at once. */
static void gm_pools_prepare(void)
{
    pthread_mutex_lock(&gm_pools_lock);
    for (struct gm_pool *p = gm_pools; p != NULL; p = p->next)
        pthread_mutex_lock(&p->lock);
}

static void gm_pools_parent(void)
{
    for (struct gm_pool *p = gm_pools; p != NULL; p = p->next)
        pthread_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&gm_pools_lock);
}

static void gm_pool_refill(struct gm_pool *p)
{
    for (size_t i = 0; i < p->count; i++)
        p->free_list[i] = p->arena + i * p->buffer_size;
    p->free_count = p->count;
}

/* In the child only the forking thread exists: every buffer is free again,
 * and no one waits on a condition variable. */
static void gm_pools_child(void)
{
    for (struct gm_pool *p = gm_pools; p != NULL; p = p->next) {
        gm_pool_refill(p);
        pthread_cond_init(&p->returned, NULL);
        pthread_mutex_unlock(&p->lock);
    }
    pthread_mutex_unlock(&gm_pools_lock);
}

static void gm_pools_register_fork(void)
{
    pthread_atfork(gm_pools_prepare, gm_pools_parent, gm_pools_child);
}

struct gm_pool *gm_pool_new(size_t buffer_size, size_t count)
{
    if (buffer_size == 0 || count == 0)
        return NULL;
    pthread_once(&gm_pools_once, gm_pools_register_fork);
    struct gm_pool *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->free_list = calloc(count, sizeof *p->free_list);
    void *arena = mmap(NULL, buffer_size * count, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p->free_list == NULL || arena == MAP_FAILED) {
        if (arena != MAP_FAILED)
            munmap(arena, buffer_size * count);
        free(p->free_list);
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->returned, NULL);
    p->arena = arena;
    p->buffer_size = buffer_size;
    p->count = count;
    gm_pool_refill(p);
    pthread_mutex_lock(&gm_pools_lock);
    p->next = gm_pools;
    gm_pools = p;
    pthread_mutex_unlock(&gm_pools_lock);
    return p;
}

void gm_pool_free(struct gm_pool *p)
{
    if (p == NULL)
        return;
    pthread_mutex_lock(&gm_pools_lock);
    for (struct gm_pool **at = &gm_pools; *at != NULL; at = &(*at)->next) {
        if (*at == p) {
            *at = p->next;
            break;
        }
    }
    pthread_mutex_unlock(&gm_pools_lock);
    munmap(p->arena, p->buffer_size * p->count);
    pthread_cond_destroy(&p->returned);
    pthread_mutex_destroy(&p->lock);
    free(p->free_list);
    free(p);
}

size_t gm_pool_buffer_size(const struct gm_pool *p)
{
    return p->buffer_size;
}

uint8_t *gm_pool_take(struct gm_pool *p)
{
    pthread_mutex_lock(&p->lock);
    while (p->free_count == 0)
        pthread_cond_wait(&p->returned, &p->lock);
    uint8_t *b = p->free_list[--p->free_count];
    pthread_mutex_unlock(&p->lock);
    return b;
}

void gm_pool_give(struct gm_pool *p, uint8_t *b)
{
    pthread_mutex_lock(&p->lock);
    p->free_list[p->free_count++] = b;
    pthread_cond_signal(&p->returned);
    pthread_mutex_unlock(&p->lock);
}
