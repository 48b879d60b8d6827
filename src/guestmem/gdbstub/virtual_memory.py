"""Guest virtual memory through a vCPU's stage 1, with the debugger's software breakpoints.

:class:`VirtualMemory` is the run-control session's
:class:`~guestmem.gdbstub.memory_commands.MemoryTarget`: each range is
translated through the selected vCPU's stage 1
(:meth:`~guestmem.gdbstub.run_control.RunControl.translate`) and then
accessed through the DEBUG access class, which never faults and never
changes a tag. Software breakpoints are BRK #0 words written into guest
memory; reads show the bytes they replaced and writes over them update the
saved copy, so GDB never sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from guestmem.errors import AddressError, GuestMemoryError
from guestmem.gdbstub.commands import InvalidRequest
from guestmem.gdbstub.run_control import BRK, RunControl, UnmappedAddressError, canonical
from guestmem.kinds import Access, TagMode
from guestmem.memory import GuestMemory
from guestmem.units import GRANULE

Pieces = list[tuple[int, int]]  # (IPA, length) in order


@dataclass
class SoftBreak:
    """A BRK #0 in guest memory: where its 4 bytes went and what they replaced."""

    pieces: Pieces
    original: bytearray

    def ipas(self) -> list[int]:
        """The IPA of each of the 4 bytes, in order."""
        return [ipa + k for ipa, n in self.pieces for k in range(n)]


class VirtualTags:
    """The allocation tags of ``count`` granules at ``pieces`` (already translated)."""

    def __init__(self, memory: GuestMemory, pieces: Pieces, count: int) -> None:
        """Name the translated range."""
        self.memory, self.pieces, self.count = memory, pieces, count

    def read(self) -> bytes:
        """One tag per granule, piece after piece."""
        return np.concatenate([self.memory.get_tags(ipa, n) for ipa, n in self.pieces]).tobytes()

    def write(self, pattern: np.ndarray) -> None:
        """``pattern`` repeated over the range; every piece checked before any is written."""
        if int(pattern.max()) > 15:
            raise InvalidRequest("a tag above 15")
        tags = np.resize(pattern, self.count)
        for ipa, n in self.pieces:
            self.memory.translate(ipa, n)
            if ipa % GRANULE or n % GRANULE:
                raise InvalidRequest("a translated piece is not granule-aligned")
        at = 0
        for ipa, n in self.pieces:
            self.memory.set_tags(ipa, n, tags[at : at + n // GRANULE])
            at += n // GRANULE


class VirtualMemory:
    """Guest memory by virtual address as vCPU ``cpu()`` sees it, breakpoints hidden."""

    def __init__(self, memory: GuestMemory, run: RunControl, cpu: Callable[[], int]) -> None:
        """Translate with ``run`` for the vCPU ``cpu`` names (the session's Hg thread)."""
        self.memory = memory
        self.run = run
        self.cpu = cpu
        self.soft: dict[int, SoftBreak] = {}  # software breakpoints by address

    def strip(self, address: int) -> int:
        """The canonical virtual address (:func:`~guestmem.gdbstub.run_control.canonical`)."""
        return canonical(address)

    def translate(self, va: int, length: int) -> Pieces:
        """``[va, va + length)`` as IPA pieces; any failure is an :class:`AddressError`."""
        if va + length > 1 << 64:
            raise UnmappedAddressError("range wraps past 2**64", va=va, length=length)
        try:
            pieces = self.run.translate(self.cpu(), va, length)
        except AddressError:
            raise
        except GuestMemoryError as error:  # e.g. vmm.stage1's TranslationError: still E0e
            raise UnmappedAddressError(str(error), va=va, length=length) from error
        if sum(n for _, n in pieces) != length:
            raise UnmappedAddressError("translation pieces do not add up", va=va, length=length)
        return pieces

    def _mapped_prefix(self, va: int, length: int) -> Pieces:
        """The pieces of the longest mapped start of the range (a read may be partial)."""
        try:
            return self.translate(va, length)
        except GuestMemoryError:
            if length <= 1:
                raise
        good, bad = 0, length
        while bad - good > 1:
            middle = (good + bad) // 2
            try:
                self.translate(va, middle)
                good = middle
            except GuestMemoryError:
                bad = middle
        return self.translate(va, good) if good else self.translate(va, 1)

    def read_pieces(self, pieces: Pieces) -> bytes:
        """Guest memory at ``pieces``, breakpoints shown as the bytes they replaced."""
        out = bytearray()
        for ipa, n in pieces:
            data = bytearray(self.memory.read(ipa, n, access=Access.DEBUG))
            for brk in self.soft.values():
                for k, at in enumerate(brk.ipas()):
                    if ipa <= at < ipa + n:
                        data[at - ipa] = brk.original[k]
            out += data
        return bytes(out)

    def write_pieces(self, pieces: Pieces, data: bytes) -> None:
        """Write ``data``; bytes under a breakpoint update its saved copy instead."""
        staged: list[tuple[int, bytearray]] = []
        at = 0
        for ipa, n in pieces:
            staged.append((ipa, bytearray(data[at : at + n])))
            at += n
        for brk in self.soft.values():
            for k, where in enumerate(brk.ipas()):
                for ipa, chunk in staged:
                    if ipa <= where < ipa + len(chunk):
                        brk.original[k] = chunk[where - ipa]
                        chunk[where - ipa] = BRK[k]
        for ipa, chunk in staged:
            self.memory.translate(ipa, len(chunk))  # all or nothing: every piece checked first
        for ipa, chunk in staged:
            self.memory.write(ipa, chunk, access=Access.DEBUG)

    def read(self, address: int, length: int) -> bytes:
        """Up to ``length`` bytes: as far as the stage 1 maps the range."""
        return self.read_pieces(self._mapped_prefix(address, length))

    def write(self, address: int, data: bytes) -> None:
        """All of ``data`` or nothing."""
        if data:
            self.write_pieces(self.translate(address, len(data)), data)

    def tags(self, first: int, count: int) -> VirtualTags:
        """The tags of ``count`` granules from ``first``, translated now."""
        return VirtualTags(self.memory, self.translate(first, count * GRANULE), count)

    def is_tagged(self, address: int) -> bool:
        """Whether ``address`` maps to guest memory with tags."""
        if self.memory.tag_mode is TagMode.NONE:
            return False
        try:
            for ipa, n in self.translate(address, 1):
                self.memory.translate(ipa, n)
        except GuestMemoryError:
            return False
        return True

    def insert_breakpoint(self, address: int, kind: int) -> None:
        """A BRK #0 at ``address`` (``kind`` 4, word-aligned); once only."""
        if kind != len(BRK) or address % len(BRK):
            raise InvalidRequest(f"software breakpoint of kind {kind} at {address:#x}")
        if address in self.soft:
            return
        pieces = self.translate(address, len(BRK))
        original = bytearray(self.read_pieces(pieces))
        self.write_pieces(pieces, BRK)
        self.soft[address] = SoftBreak(pieces, original)

    def remove_breakpoint(self, address: int) -> None:
        """The bytes a BRK at ``address`` replaced go back (nothing if there is none)."""
        brk = self.soft.pop(address, None)
        if brk is not None:
            self.write_pieces(brk.pieces, bytes(brk.original))

    def smaps(self) -> bytes:
        """The whole address space as one mapping, tagged unless the memory has no tags.

        GDB 13 asks whether an address lies in an ``mt`` mapping before any
        tag packet; which addresses are mapped is the stage 1's business,
        answered by the tag packets themselves (E0e).
        """
        flags = "rd wr mr mw me ac" + ("" if self.memory.tag_mode is TagMode.NONE else " mt")
        return (
            "0000000000000000-ffffffffffffffff rw-p 00000000 00:00 0          [guest]\n"
            f"VmFlags: {flags} \n"
        ).encode()
