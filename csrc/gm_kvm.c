#include "gm_kvm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "gm_status.h"

/* The KVM ABI (Documentation/virt/kvm/api.rst), spelled out so that the core
 * builds on hosts whose headers lack the arm64 parts. */
#define GM_KVMIO 0xAE
#define GM_KVM_CREATE_VM _IO(GM_KVMIO, 0x01)
#define GM_KVM_CHECK_EXTENSION _IO(GM_KVMIO, 0x03)
#define GM_KVM_CAP_ARM_MTE 205
#define GM_KVM_TAGS_TO_GUEST 0
#define GM_KVM_TAGS_FROM_GUEST 1

struct gm_kvm_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct gm_kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t pad[64];
};

struct gm_kvm_copy_mte_tags {
    uint64_t guest_ipa;
    uint64_t length;
    void *addr;
    uint64_t flags;
    uint64_t reserved[2];
};

#define GM_KVM_SET_USER_MEMORY_REGION _IOW(GM_KVMIO, 0x46, struct gm_kvm_memory_region)
#define GM_KVM_ENABLE_CAP _IOW(GM_KVMIO, 0xa3, struct gm_kvm_enable_cap)
#define GM_KVM_ARM_MTE_COPY_TAGS _IOR(GM_KVMIO, 0xb4, struct gm_kvm_copy_mte_tags)

int gm_kvm_open(void)
{
    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    return fd < 0 ? GM_ERR_ERRNO : fd;
}

int gm_kvm_check_extension(int kvm_fd, int capability)
{
    int r = ioctl(kvm_fd, GM_KVM_CHECK_EXTENSION, capability);
    return r < 0 ? GM_ERR_ERRNO : r;
}

int gm_kvm_create_vm(int kvm_fd)
{
    int fd = ioctl(kvm_fd, GM_KVM_CREATE_VM, 0);
    if (fd < 0)
        return GM_ERR_ERRNO;
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
}

int gm_kvm_enable_mte(int vm_fd)
{
    struct gm_kvm_enable_cap cap;
    memset(&cap, 0, sizeof cap);
    cap.cap = GM_KVM_CAP_ARM_MTE;
    return ioctl(vm_fd, GM_KVM_ENABLE_CAP, &cap) < 0 ? GM_ERR_ERRNO : GM_OK;
}

int gm_kvm_add_memslot(int vm_fd, uint32_t slot, uint64_t gpa, uint64_t size, uint8_t *host)
{
    struct gm_kvm_memory_region region = {
        .slot = slot,
        .guest_phys_addr = gpa,
        .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)host,
    };
    return ioctl(vm_fd, GM_KVM_SET_USER_MEMORY_REGION, &region) < 0 ? GM_ERR_ERRNO : GM_OK;
}

long gm_kvm_ioctl(int fd, unsigned long request, void *arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? GM_ERR_ERRNO : r;
}

static int copy_tags(int vm_fd, uint64_t gpa, uint64_t length, uint8_t *tags, int flags)
{
    struct gm_kvm_copy_mte_tags copy = {
        .guest_ipa = gpa, .length = length, .addr = tags, .flags = (uint64_t)flags,
    };
    long done = ioctl(vm_fd, GM_KVM_ARM_MTE_COPY_TAGS, &copy);
    if (done < 0)
        return GM_ERR_ERRNO;
    if ((uint64_t)done != length) {
        errno = EFAULT;
        return GM_ERR_ERRNO;
    }
    return GM_OK;
}

/* The ioctl works on whole host pages (4, 16 or 64 KiB: the kernel's, not a
 * fixed 4 KiB): the first and the end of the host pages that cover a range. */
static uint64_t host_page_mask(void)
{
    static uint64_t mask;
    if (mask == 0)
        mask = (uint64_t)sysconf(_SC_PAGESIZE) - 1;
    return mask;
}

static uint64_t cover_start(uint64_t gpa)
{
    return gpa & ~host_page_mask();
}

static uint64_t cover_end(uint64_t gpa, size_t granules)
{
    return (gpa + granules * 16u + host_page_mask()) & ~host_page_mask();
}

/* Read the tags of the host pages that cover the range. */
static int read_cover(int vm_fd, uint64_t gpa, size_t granules, uint8_t **cover, uint64_t *first)
{
    uint64_t start = cover_start(gpa);
    uint64_t end = cover_end(gpa, granules);
    uint8_t *tags = malloc((end - start) / 16u);
    if (tags == NULL)
        return GM_ERR_ERRNO;
    int status = copy_tags(vm_fd, start, end - start, tags, GM_KVM_TAGS_FROM_GUEST);
    if (status != GM_OK) {
        free(tags);
        return status;
    }
    *cover = tags;
    *first = start;
    return GM_OK;
}

int gm_kvm_tags_get(int vm_fd, uint64_t gpa, size_t granules, uint8_t *out)
{
    if (granules == 0)
        return GM_OK;
    uint8_t *cover;
    uint64_t start;
    int status = read_cover(vm_fd, gpa, granules, &cover, &start);
    if (status != GM_OK)
        return status;
    memcpy(out, cover + (gpa - start) / 16u, granules);
    free(cover);
    return GM_OK;
}

int gm_kvm_tags_set(int vm_fd, uint64_t gpa, size_t granules, const uint8_t *tags, int uniform_tag)
{
    if (granules == 0)
        return GM_OK;
    uint8_t *cover;
    uint64_t start;
    int status = read_cover(vm_fd, gpa, granules, &cover, &start);
    if (status != GM_OK)
        return status;
    uint8_t *at = cover + (gpa - start) / 16u;
    if (tags)
        memcpy(at, tags, granules);
    else
        memset(at, uniform_tag, granules);
    uint64_t end = cover_end(gpa, granules);
    status = copy_tags(vm_fd, start, end - start, cover, GM_KVM_TAGS_TO_GUEST);
    free(cover);
    return status;
}
