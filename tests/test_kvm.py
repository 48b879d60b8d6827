"""TagMode.KVM against a real kernel's KVM (arm64-kernel lane): tags through
KVM_ARM_MTE_COPY_TAGS, kernel errors as typed exceptions."""

from __future__ import annotations

import errno

import numpy as np
import pytest

import guestmem as gm
from conftest import LANE

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        not gm.kvm_mte_available(),
        reason="needs /dev/kvm with KVM_CAP_ARM_MTE: runs in the arm64-kernel lane",
    ),
]
GPA = 0x8000_0000


@pytest.fixture
def vm_mem() -> gm.GuestMemory:
    return gm.GuestMemory.from_layout([(GPA, 0x10000), (GPA + 0x10000, 0x10000)], tags="kvm")


def test_tags_written_to_the_guest_read_back(vm_mem: gm.GuestMemory) -> None:
    tags = (np.arange(0x20000 // 16) % 16).astype(np.uint8)
    vm_mem.set_tags(GPA, 0x20000, tags)
    np.testing.assert_array_equal(vm_mem.get_tags(GPA, 0x20000), tags)
    # sub-page ranges: read-modify-write of the page's tags
    vm_mem.set_tags(GPA + 0x1010, 32, [9, 10])
    assert vm_mem.get_tags(GPA + 0x1000, 64).tolist() == [0, 9, 10, 3]
    vm_mem.close()


def test_a_never_tagged_page_reads_zeros(vm_mem: gm.GuestMemory) -> None:
    assert not vm_mem.get_tags(GPA + 0x8000, 4096).any()
    vm_mem.close()


def test_the_vmm_mapping_is_untagged_and_checked_compares_kvm_tags(vm_mem: gm.GuestMemory) -> None:
    vm_mem.set_tags(GPA, 64, 6)
    vm_mem.view(GPA, 64)[:] = 1  # a plain access: no PROT_MTE, so no fault
    assert vm_mem.read(GPA, 64, route=gm.Route.CHECKED, tag=6) == b"\x01" * 64
    with pytest.raises(gm.TagCheckError) as caught:
        vm_mem.write(GPA + 60, b"xxxxxxxx", route=gm.Route.CHECKED, tag=6)
    assert (caught.value.gpa, caught.value.allocation_tag) == (GPA + 64, 0)
    for route in (gm.Route.TCO, gm.Route.MATCH_ALL, gm.Route.BOUNCE, gm.Route.UNCHECKED_THREAD):
        vm_mem.write(GPA + 3, b"route" * 100, route=route)
        assert vm_mem.read(GPA + 3, 500, route=route) == b"route" * 100
    assert vm_mem.get_tags(GPA, 64).tolist() == [6, 6, 6, 6]
    vm_mem.close()


def test_misaligned_and_out_of_slot_ranges_raise(vm_mem: gm.GuestMemory) -> None:
    with pytest.raises(gm.AlignmentError):
        vm_mem.get_tags(GPA + 8, 16)
    with pytest.raises(gm.AddressError):
        vm_mem.get_tags(GPA + 0x20000, 16)
    vm = gm.KvmVm.create()
    try:
        with pytest.raises(gm.NativeOSError) as caught:
            vm.get_tags(0x1000_0000, 16)  # no memslot there
        assert caught.value.errno in (errno.EFAULT, errno.ENOENT, errno.EINVAL)
        with pytest.raises(gm.AlignmentError):
            vm.get_tags(0x1000_0008, 1)
    finally:
        vm.close()
    vm_mem.close()


def test_kvm_is_offered_only_where_it_works() -> None:
    assert gm.TagMode.KVM in gm.available_tag_modes()
    assert LANE == "arm64-kernel"
