"""The VMM's public paths raise guestmem's typed errors (still the builtins they resemble)."""

from __future__ import annotations

import pytest

import guestmem as gm
from guestmem.vmm import gic, layout
from guestmem.vmm import state_codec as codec
from guestmem.vmm.kvm_binding import Pointee


def test_too_many_sections_is_a_usage_error() -> None:
    with pytest.raises(gm.UsageError, match="sections") as caught:
        codec.encode([(f"s{i}", b"") for i in range(codec.MAX_SECTIONS + 1)])
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("cpus", [0, layout.MAX_CPUS + 1])
def test_a_gic_for_too_few_or_too_many_vcpus_is_a_usage_error(cpus: int) -> None:
    with pytest.raises(gm.UsageError, match="vGIC layout holds") as caught:
        gic.Gic(-1, cpus)  # refused before any ioctl
    assert isinstance(caught.value, ValueError)


def test_a_pointee_holds_bytes_at_a_fixed_address() -> None:
    assert Pointee(4).value() == bytes(4)
    assert Pointee(b"\x01\x02").value() == b"\x01\x02"
    shared = bytearray(b"abc")
    pointee = Pointee(shared)
    assert pointee.address != 0 and pointee.value() == b"abc"
    shared[0] = ord("z")  # the kernel's writes land in the caller's buffer
    assert pointee.value() == b"zbc"
