"""KVM as the tag source (TagMode.KVM).

A VM with KVM_CAP_ARM_MTE whose memslots are the guest regions. The VMM's
mapping of guest RAM has no PROT_MTE, so its data accesses are unchecked by
construction; allocation tags are read and written through
KVM_ARM_MTE_COPY_TAGS (whole pages: sub-page ranges are read, changed and
written back). Errors from the kernel become NativeOSError with errno.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from guestmem._native import (
    OK,
    check,
    kvm_add_memslot,
    kvm_check_extension,
    kvm_create_vm,
    kvm_enable_mte,
    kvm_open,
    kvm_tags_get,
    kvm_tags_set,
    last_errno,
)
from guestmem.errors import (
    AlignmentError,
    ClosedError,
    NativeOSError,
    TagsBusyError,
    UnsupportedError,
)

if TYPE_CHECKING:
    from guestmem.region import GuestRegion

KVM_CAP_ARM_MTE = 205


def _status(value: int, what: str) -> int:
    if value < 0:
        check(value, what)
    return value


def kvm_mte_available() -> bool:
    """Whether /dev/kvm opens and offers KVM_CAP_ARM_MTE."""
    fd = kvm_open()
    if fd < 0:
        return False
    try:
        return kvm_check_extension(fd, KVM_CAP_ARM_MTE) > 0
    finally:
        os.close(fd)


class KvmVm:
    """A KVM virtual machine with MTE enabled, serving as a tag source.

    Made by :meth:`create` before any vCPU exists (KVM_ENABLE_CAP requires
    it); a VMM that already has its VM passes its fd to :meth:`adopt`.
    """

    def __init__(self, vm_fd: int, *, owned: bool) -> None:
        """Wrap ``vm_fd``; prefer :meth:`create` or :meth:`adopt`."""
        self.fd = vm_fd
        self._owned = owned
        self._next_slot = 0
        # Calls using the fd now, and whether close() waits for them: the fd
        # is never closed under an ioctl (its number could be reused at once).
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False

    @classmethod
    def create(cls) -> KvmVm:
        """Open /dev/kvm, create a VM and enable KVM_CAP_ARM_MTE on it."""
        kvm = kvm_open()
        if kvm < 0:
            raise UnsupportedError(f"/dev/kvm cannot be opened: {os.strerror(last_errno())}")
        try:
            if kvm_check_extension(kvm, KVM_CAP_ARM_MTE) <= 0:
                raise UnsupportedError("this KVM does not offer KVM_CAP_ARM_MTE")
            vm = _status(kvm_create_vm(kvm), "KVM_CREATE_VM")
        finally:
            os.close(kvm)
        try:
            _status(kvm_enable_mte(vm), "KVM_ENABLE_CAP(KVM_CAP_ARM_MTE)")
        except BaseException:
            os.close(vm)
            raise
        return cls(vm, owned=True)

    @classmethod
    def adopt(cls, vm_fd: int, first_slot: int = 0) -> KvmVm:
        """Use a VM the VMM made (with MTE already enabled); it stays the VMM's to close."""
        vm = cls(vm_fd, owned=False)
        vm._next_slot = first_slot
        return vm

    def add_region(self, region: GuestRegion) -> int:
        """Register ``region`` as the next memslot; return the slot number."""
        slot = self._next_slot
        with self.in_use() as fd:
            status = kvm_add_memslot(fd, slot, region.gpa, region.size, region.host_address)
        try:
            check(status, f"KVM_SET_USER_MEMORY_REGION slot {slot} at {region.gpa:#x}")
        except NativeOSError as err:
            if err.errno == errno.EINVAL and region.fd is not None:
                raise UnsupportedError(
                    f"KVM refused memfd region {region.gpa:#x} as a memslot of an MTE VM "
                    f"(EINVAL): Linux before 6.2 allows no shared mappings there"
                ) from err
            raise
        self._next_slot += 1
        return slot

    def get_tags(self, gpa: int, granules: int) -> npt.NDArray[np.uint8]:
        """The tags of ``granules`` granules from ``gpa`` (16-byte aligned), via the ioctl."""
        _require_granule(gpa)
        out = np.empty(granules, dtype=np.uint8)
        self.get_tags_into(gpa, out)
        return out

    def get_tags_into(self, gpa: int, out: npt.NDArray[np.uint8]) -> None:
        """Fill ``out`` (one uint8 per granule) with the tags from ``gpa``."""
        with self.in_use() as fd:
            status = kvm_tags_get(fd, gpa, out)
        check(status, "KVM_ARM_MTE_COPY_TAGS")

    def set_tags(self, gpa: int, granules: int, tags: npt.NDArray[np.uint8] | int) -> None:
        """Set ``granules`` tags from ``gpa``: one per granule, or one for all."""
        _require_granule(gpa)
        with self.in_use() as fd:
            status = kvm_tags_set(fd, gpa, granules, tags)
        check_tags_written(status)

    @contextmanager
    def in_use(self) -> Iterator[int]:
        """The VM fd, kept open for the scope; ClosedError once :meth:`close` was called."""
        with self._lock:
            if self._closing or self.fd < 0:
                raise ClosedError("the KVM VM is closed")
            self._users += 1
            fd = self.fd
        try:
            yield fd
        finally:
            with self._lock:
                self._users -= 1
                last = self._closing and self._users == 0
            if last:
                self._close_now()

    def close(self) -> None:
        """Close the VM, if this object made it: now, or when the last call using it returns."""
        with self._lock:
            self._closing = True
            if self._users:
                return
        self._close_now()

    def _close_now(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if self._owned and fd >= 0:
            os.close(fd)


def _require_granule(gpa: int) -> None:
    if gpa % 16:
        raise AlignmentError(f"tag gpa {gpa:#x} is not 16-byte aligned", value=gpa, alignment=16)


def check_tags_written(status: int) -> None:
    """Raise for a failed KVM_ARM_MTE_COPY_TAGS to the guest: TagsBusyError for EBUSY."""
    if status != OK and last_errno() == errno.EBUSY:
        raise TagsBusyError(
            errno.EBUSY,
            "KVM_ARM_MTE_COPY_TAGS: KVM writes no tags while it logs dirty pages "
            "(a live migration is running); no tag was written",
        )
    check(status, "KVM_ARM_MTE_COPY_TAGS")


def memslots_vm(regions: Sequence[GuestRegion], kvm: KvmVm | None) -> KvmVm:
    """``kvm`` (or a new VM with MTE) with ``regions`` as its next memslots.

    A VM made here is closed again if a region is refused.
    """
    vm = kvm or KvmVm.create()
    try:
        for region in regions:
            vm.add_region(region)
    except BaseException:
        if kvm is None:
            vm.close()
        raise
    return vm
