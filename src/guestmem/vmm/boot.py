"""Loading the guest: an arm64 Linux ``Image``, an initrd and the device tree.

Linux's arm64 boot protocol (Documentation/arch/arm64/booting.rst): the
image goes ``text_offset`` bytes above a 2 MiB-aligned base in RAM and is
entered at its first byte with x0 holding the device tree's address, the
MMU off and interrupts masked (KVM_ARM_VCPU_INIT's reset state). A
gzip-compressed image (``Image.gz``) is unpacked first. The device tree goes
at the next 2 MiB boundary above the image's ``image_size``, the initrd
above that; everything is written through the DMA access class, so it
lands untouched in tagged RAM and never faults.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass

import guestmem as gm
from guestmem.errors import GuestMemoryError

IMAGE_MAGIC = b"ARM\x64"
_HEADER = struct.Struct(
    "<II QQQ QQQ 4s I"
)  # code0, code1, text_offset, image_size, flags, res2..4, magic, res5
_ALIGN = 2 << 20
_DTB_SPACE = 2 << 20  # booting.rst: the tree must not exceed 2 MiB


class BootError(GuestMemoryError, ValueError):
    """The kernel, initrd or device tree cannot be loaded as given."""


@dataclass(frozen=True)
class KernelImage:
    """An arm64 Linux image: its bytes and what its header says."""

    data: bytes
    text_offset: int
    image_size: int  # bytes the kernel occupies once running (bss included)

    @classmethod
    def parse(cls, data: bytes) -> KernelImage:
        """Check and read the header of an ``Image`` (or ``Image.gz``)."""
        if data[:2] == b"\x1f\x8b":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as err:
                raise BootError(f"the kernel is a damaged gzip stream: {err}") from err
        if len(data) < _HEADER.size:
            raise BootError(f"the kernel is {len(data)} bytes: too short for an arm64 Image")
        fields = _HEADER.unpack_from(data)
        text_offset, image_size, magic = fields[2], fields[3], fields[8]
        if magic != IMAGE_MAGIC:
            raise BootError("the kernel is not an arm64 Linux Image (no 'ARM\\x64' magic)")
        return cls(data, text_offset, max(image_size, len(data)))


@dataclass(frozen=True)
class BootPlan:
    """Where each piece lands in guest physical memory, and where the vCPU starts."""

    entry: int
    kernel: tuple[int, int]
    dtb: int
    initrd: tuple[int, int] | None


def plan(ram_base: int, ram_size: int, kernel: KernelImage, initrd_size: int | None) -> BootPlan:
    """Place the kernel, the device tree and the initrd in RAM, or say why they do not fit."""
    base = _align_up(ram_base, _ALIGN)
    entry = base + kernel.text_offset
    dtb = _align_up(entry + kernel.image_size, _ALIGN)
    end = dtb + _DTB_SPACE
    initrd = None
    if initrd_size is not None:
        initrd = (end, end + initrd_size)
        end = initrd[1]
    if end > ram_base + ram_size:
        raise BootError(
            f"the kernel ({kernel.image_size} bytes) and initrd ({initrd_size or 0} bytes) "
            f"need {end - ram_base} bytes of RAM; the guest has {ram_size}"
        )
    return BootPlan(entry, (entry, entry + len(kernel.data)), dtb, initrd)


def load(
    mem: gm.GuestMemory, plan: BootPlan, kernel: KernelImage, initrd: bytes | None, dtb: bytes
) -> None:
    """Write the kernel, the initrd and the device tree into guest RAM."""
    if len(dtb) > _DTB_SPACE:
        raise BootError(f"the device tree is {len(dtb)} bytes; the boot protocol allows 2 MiB")
    mem.write(plan.kernel[0], kernel.data, access=gm.Access.DMA)
    if initrd is not None and plan.initrd is not None:
        mem.write(plan.initrd[0], initrd, access=gm.Access.DMA)
    mem.write(plan.dtb, dtb, access=gm.Access.DMA)


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
