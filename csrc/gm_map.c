#define _GNU_SOURCE
#include "gm_map.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gm_insn.h"
#include "gm_platform.h"

#ifndef PROT_MTE
#define PROT_MTE 0x20
#endif

static struct gm_mapping *map_with(int fd, size_t size, int mte, int owns_fd, uint64_t offset)
{
    struct gm_mapping *m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    int prot = PROT_READ | PROT_WRITE | (mte ? PROT_MTE : 0);
    int flags = fd < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : MAP_SHARED;
    void *addr = mmap(NULL, size, prot, flags, fd, (off_t)offset);
    if (addr == MAP_FAILED) {
        int saved = errno;
        if (owns_fd)
            close(fd);
        free(m);
        errno = saved;
        return NULL;
    }
    m->addr = addr;
    m->size = size;
    m->fd = fd;
    m->mte = mte;
    return m;
}

struct gm_mapping *gm_map_anonymous(size_t size, int mte)
{
    return map_with(-1, size, mte, 0, 0);
}

struct gm_mapping *gm_map_memfd(const char *name, size_t size, int mte)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0)
        return NULL;
    if (ftruncate(fd, (off_t)size) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return NULL;
    }
    return map_with(fd, size, mte, 1, 0);
}

struct gm_mapping *gm_map_fd(int fd, size_t size, int mte)
{
    return gm_map_fd_at(fd, size, mte, 0);
}

struct gm_mapping *gm_map_fd_at(int fd, size_t size, int mte, uint64_t offset)
{
    if (offset > (uint64_t)INT64_MAX) {
        errno = EINVAL;
        return NULL;
    }
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0)
        return NULL;
    return map_with(own, size, mte, 1, offset);
}

void gm_mapping_free(struct gm_mapping *m)
{
    if (m == NULL)
        return;
    munmap(m->addr, m->size);
    if (m->fd >= 0)
        close(m->fd);
    free(m);
}

int gm_mapping_keeps_tags(struct gm_mapping *m)
{
    if (!m->mte || !gm_cpu_has_mte())
        return 0;
    unsigned before = gm_ldg(m->addr);
    unsigned probe = before == 0 ? 1 : 0;
    gm_stg(m->addr, probe);
    int kept = gm_ldg(m->addr) == probe;
    gm_stg(m->addr, before);
    return kept;
}
