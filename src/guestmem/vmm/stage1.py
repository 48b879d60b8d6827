"""Guest virtual to guest physical: a walk of the guest's AArch64 stage-1 tables.

The GDB stub is handed guest virtual addresses. This module walks the EL1&0
regime's translation tables (VMSAv8-64: 4, 16 and 64 KiB granules) in guest
RAM, reading each descriptor through guestmem as a DEBUG access, so a walk
never trips a tag check. With TCR_EL1.DS (FEAT_LPA2, 4 and 16 KiB granules:
what Linux 6.12 built for 52-bit addresses sets on a CPU that has it) input
addresses reach 52 bits, a 4 KiB walk starts at level -1, output addresses
take bits 51:50 from descriptor bits 9:8 and the table base's from TTBR bits
5:2. Permissions, the access flag and the contiguous hint do not change
where an address goes and are ignored; 52-bit output addresses with a 64 KiB
granule (FEAT_LPA) are not decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from guestmem.errors import (
    AddressError,
    ArgumentTypeError,
    GuestMemoryError,
    LengthError,
    UnsupportedError,
)
from guestmem.kinds import Access
from guestmem.memory import GuestMemory

VA_LIMIT = 1 << 64
PA_BITS = 48
_PA_MASK = (1 << PA_BITS) - 1
_TTBR_BADDR = _PA_MASK & ~1  # bits 47:1; ASID above, CnP in bit 0
_LPA2_TTBR_BADDR = _PA_MASK & ~0x3F  # bits 47:6; 51:48 sit in bits 5:2
_LPA2_OA_LOW = (1 << 50) - 1  # descriptor bits 49:granule; 51:50 sit in bits 9:8
_MIN_TXSZ = 16
_LPA2_MIN_TXSZ = 12
_MAX_TXSZ = {12: 48, 14: 47, 16: 47}  # by granule shift, as with FEAT_TTST
_TG0_SHIFTS = {0: 12, 1: 16, 2: 14}
_TG1_SHIFTS = {2: 12, 3: 16, 1: 14}
_BLOCK_LEVELS = {12: (1, 2), 14: (2,), 16: (2,)}
_LPA2_BLOCK_LEVELS = {12: (0, 1, 2), 14: (1, 2)}
# Each half's TCR_EL1 fields: EPDn bit, TnSZ and TGn positions, TGn encodings.
_HALVES = {0: (7, 0, 14, _TG0_SHIFTS), 1: (23, 16, 30, _TG1_SHIFTS)}
_LEVELS = 4  # a walk ends by level 3 (it may start at -1)


@dataclass(frozen=True)
class TranslationRegs:
    """A vCPU's SCTLR_EL1, TCR_EL1, TTBR0_EL1 and TTBR1_EL1: what a stage-1 walk reads."""

    sctlr: int
    tcr: int
    ttbr0: int
    ttbr1: int


class TranslationError(GuestMemoryError, ValueError):
    """A guest virtual address that the guest's stage-1 tables do not map.

    ``address`` is the virtual address; ``level`` is the table level whose
    descriptor failed, or None when the walk failed before reading one.
    """

    def __init__(self, message: str, *, address: int, level: int | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.level = level


@dataclass(frozen=True)
class _Walk:
    """One half of the virtual address space: its table base, granule and input size."""

    name: str
    table: int
    shift: int
    input_bits: int
    lpa2: bool = False

    @property
    def stride(self) -> int:
        return self.shift - 3

    @property
    def start_level(self) -> int:
        levels = -(-(self.input_bits - self.shift) // self.stride)
        return 4 - levels

    @property
    def block_levels(self) -> tuple[int, ...]:
        return _LPA2_BLOCK_LEVELS[self.shift] if self.lpa2 else _BLOCK_LEVELS[self.shift]

    def output(self, desc: int, size: int) -> int:
        """The output address in a table, page or block descriptor, aligned to ``size``."""
        if self.lpa2:
            return (desc & _LPA2_OA_LOW | (desc >> 8 & 3) << 50) & ~(size - 1)
        return desc & _PA_MASK & ~(size - 1)


def translate(mem: GuestMemory, regs: TranslationRegs, va: int) -> int:
    """The guest physical address (IPA) of the guest virtual address ``va``.

    Raises TranslationError when ``va`` is not mapped, and UnsupportedError
    for the 52-bit address forms.
    """
    return _translate(mem, regs, _check_va(va))[0]


def ranges(mem: GuestMemory, regs: TranslationRegs, va: int, length: int) -> list[tuple[int, int]]:
    """The ``(ipa, length)`` pieces of the virtual range ``[va, va + length)``.

    Pieces end where a page or block ends, and physically contiguous pieces
    are merged. All of the range must be mapped (TranslationError otherwise).
    """
    start = _check_va(va)
    if isinstance(length, bool) or not isinstance(length, int):
        raise ArgumentTypeError(f"a length must be an integer, not {type(length).__name__}")
    if length < 0:
        raise LengthError(f"negative length {length}")
    if start + length > VA_LIMIT:
        raise TranslationError(
            f"guest virtual range [{start:#x}, +{length:#x}) wraps past 2**64", address=start
        )
    pieces: list[tuple[int, int]] = []
    while length:
        ipa, left = _translate(mem, regs, start)
        n = min(left, length)
        if pieces and pieces[-1][0] + pieces[-1][1] == ipa:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)
        else:
            pieces.append((ipa, n))
        start += n
        length -= n
    return pieces


def _check_va(va: object) -> int:
    if isinstance(va, bool) or not isinstance(va, int):
        raise ArgumentTypeError(
            f"a guest virtual address must be an integer, not {type(va).__name__}"
        )
    if not 0 <= va < VA_LIMIT:
        raise TranslationError(f"{va:#x} is not a 64-bit guest virtual address", address=va)
    return va


def _translate(mem: GuestMemory, regs: TranslationRegs, va: int) -> tuple[int, int]:
    """``va``'s IPA and the number of bytes from it to the end of its page or block."""
    upper = va >> 55 & 1
    tbi = regs.tcr >> (38 if upper else 37) & 1
    address = va & ((1 << 56) - 1) if tbi else va
    if not regs.sctlr & 1:
        if address >> PA_BITS:
            raise TranslationError(
                f"guest virtual address {va:#x} is beyond the {PA_BITS}-bit physical "
                "address space (the MMU is off)",
                address=va,
            )
        return address, (1 << PA_BITS) - address
    walk = _walk_for(regs, va, upper)
    # Above the input size, every bit (to 55 with TBI, else to 63) copies bit 55.
    width = (56 if tbi else 64) - walk.input_bits
    if address >> walk.input_bits != ((1 << width) - 1 if upper else 0):
        raise TranslationError(
            f"guest virtual address {va:#x} is outside the {walk.input_bits}-bit "
            f"range of {walk.name}",
            address=va,
        )
    return _walk_tables(mem, walk, va)


def _walk_for(regs: TranslationRegs, va: int, upper: int) -> _Walk:
    """The walk of the half of the address space that bit 55 of ``va`` selects."""
    tcr = regs.tcr
    epd_bit, txsz_bit, tg_bit, shifts = _HALVES[upper]
    name, field = f"TTBR{upper}", f"T{upper}SZ"
    txsz, tg = tcr >> txsz_bit & 63, tcr >> tg_bit & 3
    if tcr >> epd_bit & 1:
        raise TranslationError(
            f"guest virtual address {va:#x} is not mapped (walks through {name} are "
            f"disabled by TCR_EL1.EPD{upper})",
            address=va,
        )
    shift = shifts.get(tg)
    if shift is None:
        raise TranslationError(
            f"guest virtual address {va:#x} cannot be walked: TCR_EL1.TG{upper} = {tg} "
            "is a reserved granule",
            address=va,
        )
    lpa2 = bool(tcr >> 59 & 1) and shift in _LPA2_BLOCK_LEVELS
    if txsz < (_LPA2_MIN_TXSZ if lpa2 else _MIN_TXSZ):
        raise UnsupportedError(
            f"TCR_EL1.{field} = {txsz}: virtual addresses wider than "
            f"{64 - (_LPA2_MIN_TXSZ if lpa2 else _MIN_TXSZ)} bits are not supported"
            + ("" if lpa2 else " without TCR_EL1.DS (FEAT_LPA2)")
        )
    if txsz > _MAX_TXSZ[shift]:
        raise TranslationError(
            f"guest virtual address {va:#x} cannot be walked: TCR_EL1.{field} = {txsz} "
            f"is above {_MAX_TXSZ[shift]} for a {_kib(shift)} KiB granule",
            address=va,
        )
    ttbr = regs.ttbr1 if upper else regs.ttbr0
    if lpa2:
        table = ttbr & _LPA2_TTBR_BADDR | (ttbr >> 2 & 0xF) << 48
        return _Walk(name, table, shift, 64 - txsz, lpa2=True)
    return _Walk(name, ttbr & _TTBR_BADDR, shift, 64 - txsz)


def _walk_tables(mem: GuestMemory, walk: _Walk, va: int) -> tuple[int, int]:
    """Read descriptors from the start level down to the page or block that maps ``va``."""
    table, shift, stride = walk.table, walk.shift, walk.stride
    for level in range(walk.start_level, _LEVELS):
        low = shift + stride * (3 - level)
        high = walk.input_bits if level == walk.start_level else low + stride
        index = va >> low & ((1 << (high - low)) - 1)
        desc = _descriptor(mem, table + 8 * index, va, level)
        kind = desc & 3
        if kind == 3 and level < 3:
            table = walk.output(desc, 1 << shift)
            continue
        if (kind == 3 and level == 3) or (kind == 1 and level in walk.block_levels):
            size = 1 << low
            offset = va & (size - 1)
            return walk.output(desc, size) + offset, size - offset
        reason = (
            f"is a block, which a {_kib(shift)} KiB granule does not allow at this level"
            if kind == 1 and level < 3
            else "invalid"
        )
        raise TranslationError(
            f"guest virtual address {va:#x} is not mapped (level {level} descriptor {reason})",
            address=va,
            level=level,
        )
    raise AssertionError("unreachable: level 3 ends every walk")


def _kib(shift: int) -> int:
    return 1 << shift >> 10


def _descriptor(mem: GuestMemory, ipa: int, va: int, level: int) -> int:
    """The little-endian 64-bit descriptor at ``ipa``."""
    try:
        raw = mem.read(ipa, 8, access=Access.DEBUG)
    except AddressError as err:
        raise TranslationError(
            f"guest virtual address {va:#x} is not mapped (level {level} descriptor at "
            f"IPA {ipa:#x} is outside guest RAM)",
            address=va,
            level=level,
        ) from err
    return int.from_bytes(raw, "little")
