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
};

struct gm_pool *gm_pool_new(size_t buffer_size, size_t count)
{
    if (buffer_size == 0 || count == 0)
        return NULL;
    struct gm_pool *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->free_list = calloc(count, sizeof *p->free_list);
    void *arena = mmap(NULL, buffer_size * count, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p->free_list == NULL || arena == MAP_FAILED) {
        free(p->free_list);
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->returned, NULL);
    p->arena = arena;
    p->buffer_size = buffer_size;
    p->count = count;
    for (size_t i = 0; i < count; i++)
        p->free_list[i] = p->arena + i * buffer_size;
    p->free_count = count;
    return p;
}

void gm_pool_free(struct gm_pool *p)
{
    if (p == NULL)
        return;
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
