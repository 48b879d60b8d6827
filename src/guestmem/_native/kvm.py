"""KVM ioctls the library itself makes (TagMode.KVM): /dev/kvm, the VM, memslots, tags.

Each returns what the core returned: a file descriptor or GM_OK, else a
negative status with :func:`~guestmem._native.status.last_errno` saying why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._gm import ffi, lib


def kvm_open() -> int:
    """A new fd of /dev/kvm, or a negative status."""
    return int(lib.gm_kvm_open())


def kvm_check_extension(fd: int, capability: int) -> int:
    """KVM_CHECK_EXTENSION of ``capability`` on ``fd``."""
    return int(lib.gm_kvm_check_extension(fd, capability))


def kvm_create_vm(kvm_fd: int) -> int:
    """KVM_CREATE_VM: the new VM's fd, or a negative status."""
    return int(lib.gm_kvm_create_vm(kvm_fd))


def kvm_enable_mte(vm_fd: int) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_ARM_MTE) on a VM with no vCPU yet."""
    return int(lib.gm_kvm_enable_mte(vm_fd))


def kvm_add_memslot(vm_fd: int, slot: int, gpa: int, size: int, host_address: int) -> int:
    """KVM_SET_USER_MEMORY_REGION: ``size`` bytes at ``host_address`` as ``slot`` at ``gpa``."""
    host = ffi.cast("uint8_t *", host_address)
    return int(lib.gm_kvm_add_memslot(vm_fd, slot, gpa, size, host))


def kvm_tags_get(vm_fd: int, gpa: int, out: npt.NDArray[np.uint8]) -> int:
    """KVM_ARM_MTE_COPY_TAGS from guest: one tag a granule into ``out``."""
    dest = ffi.from_buffer("uint8_t[]", out, require_writable=True)
    return int(lib.gm_kvm_tags_get(vm_fd, gpa, out.size, dest))


def kvm_tags_set(vm_fd: int, gpa: int, granules: int, tags: npt.NDArray[np.uint8] | int) -> int:
    """KVM_ARM_MTE_COPY_TAGS to guest: one tag a granule, or ``tags`` for all."""
    source: Any = ffi.NULL
    uniform = 0
    if isinstance(tags, int):
        uniform = tags
    else:
        source = ffi.from_buffer("uint8_t[]", tags)
    return int(lib.gm_kvm_tags_set(vm_fd, gpa, granules, source, uniform))
