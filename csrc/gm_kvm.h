/* KVM as a tag source: a VM with KVM_CAP_ARM_MTE whose memslots are the
 * guest regions, and its tags through KVM_ARM_MTE_COPY_TAGS. The VMM's own
 * mapping has no PROT_MTE, so its data accesses are unchecked by construction. */
#ifndef GM_KVM_H
#define GM_KVM_H

#include <stddef.h>
#include <stdint.h>

int gm_kvm_open(void);
int gm_kvm_check_extension(int kvm_fd, int capability);
int gm_kvm_create_vm(int kvm_fd);
int gm_kvm_enable_mte(int vm_fd);
int gm_kvm_add_memslot(int vm_fd, uint32_t slot, uint64_t gpa, uint64_t size, uint8_t *host);
int gm_kvm_tags_get(int vm_fd, uint64_t gpa, size_t granules, uint8_t *out);
int gm_kvm_tags_set(int vm_fd, uint64_t gpa, size_t granules, const uint8_t *tags, int uniform_tag);

/* Any other KVM ioctl, for a VMM built on the library (vCPUs, the vGIC,
 * KVM_RUN): called without the GIL, so a vCPU thread runs while Python goes
 * on; EINTR comes back as an error (a kicked KVM_RUN), never retried here.
 * Returns the ioctl's result, or GM_ERR_ERRNO. */
long gm_kvm_ioctl(int fd, unsigned long request, void *arg);

#endif
