"""The VMM's one binding to the compiled core: raw KVM ioctls and the buffers they point to.

Its only job is marshalling (as rust-vmm's kvm-ioctls): every other VMM
module packs structures with :mod:`struct` and calls :func:`ioctl`; none
names cffi's ``lib`` or ``ffi``.
"""

from __future__ import annotations

from typing import Any

from guestmem._gm import ffi, lib
from guestmem._native import check


def ioctl(fd: int, request: int, arg: bytearray | int, what: str) -> int:
    """Make one ioctl through ``gm_kvm_ioctl`` (the GIL dropped); ``arg`` a structure or int.

    A structure is changed in place; a failure raises NativeOSError naming ``what``.
    """
    pointer: Any = ffi.cast("void *", arg) if isinstance(arg, int) else ffi.from_buffer(arg)
    result = int(lib.gm_kvm_ioctl(fd, request, pointer))
    if result < 0:
        check(result, what)
    return result


def open_kvm() -> int:
    """A new fd on /dev/kvm, or -1 when it cannot be opened."""
    return int(lib.gm_kvm_open())


class Pointee:
    """Bytes at a fixed address for the kernel to read or write through a pointer.

    Made from a size (zeroed), from bytes (copied) or over a caller's
    ``bytearray`` (shared: the kernel writes into it). Keep it alive while
    the kernel may use :attr:`address`.
    """

    def __init__(self, contents: int | bytes | bytearray) -> None:
        """Hold ``contents``: a size in bytes, bytes to copy, or a bytearray to share."""
        if isinstance(contents, bytearray):
            self._cdata: Any = ffi.from_buffer(contents)
        elif isinstance(contents, int):
            self._cdata = ffi.new("uint8_t[]", contents)
        else:
            self._cdata = ffi.new("uint8_t[]", len(contents))
            ffi.memmove(self._cdata, contents, len(contents))
        self.address = int(ffi.cast("uintptr_t", self._cdata))

    def value(self) -> bytes:
        """The bytes there now."""
        return bytes(ffi.buffer(self._cdata))
