"""Guest virtual to physical (guestmem.vmm.stage1): stage-1 tables built in
guest memory by hand, walked for each granule, input size, block size and fault."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from guestmem.vmm.stage1 import TranslationError, TranslationRegs, ranges, translate

BASE = 0x4000_0000
RAM = 8 << 20
POOL0 = BASE + (1 << 20)  # tables of TTBR0's half
POOL1 = BASE + (4 << 20)  # tables of TTBR1's half
POOL_SIZE = 3 << 20
PA_MASK = (1 << 48) - 1

SCTLR_MMU_ON = 0x30D0_1805  # M (bit 0) with the bits a Linux guest sets
SCTLR_MMU_OFF = SCTLR_MMU_ON & ~1  # only M cleared: the caches stay on
TG0 = {12: 0, 16: 1, 14: 2}  # granule shift -> TCR_EL1.TG0
TG1 = {14: 1, 12: 2, 16: 3}  # granule shift -> TCR_EL1.TG1
# The lowest VA bit each level resolves, by granule: written out, not derived.
LOW_BIT = {
    12: {-1: 48, 0: 39, 1: 30, 2: 21, 3: 12},
    14: {0: 47, 1: 36, 2: 25, 3: 14},
    16: {1: 42, 2: 29, 3: 16},
}
START_LEVEL = {(12, 48): 0, (12, 39): 1, (14, 48): 0, (14, 47): 1, (16, 48): 1, (16, 42): 2}
START_LEVEL |= {(12, 52): -1, (14, 52): 0}  # with TCR_EL1.DS (FEAT_LPA2)
# Attribute bits the walker must look past: NSTable, APTable, UXN/PXNTable on
# tables; software bits, UXN, PXN, nG, AF, SH, AP and AttrIndx on leaves.
TABLE = 0xF8 << 56 | 0b11
PAGE = 0xF << 55 | 1 << 54 | 1 << 53 | 1 << 11 | 1 << 10 | 3 << 8 | 1 << 6 | 4 << 2 | 0b11
BLOCK = PAGE & ~0b10
LPA2_PAGE = PAGE & ~(3 << 8)  # with TCR_EL1.DS, bits 9:8 are output address bits 51:50


def tcr(
    *,
    t0sz: int = 16,
    t1sz: int = 16,
    shift0: int = 12,
    shift1: int = 12,
    tbi0: bool = False,
    tbi1: bool = False,
    epd0: bool = False,
    epd1: bool = False,
    ds: bool = False,
) -> int:
    """A TCR_EL1 value, each field at its architectural position."""
    return (
        t0sz
        | epd0 << 7
        | TG0[shift0] << 14
        | t1sz << 16
        | epd1 << 23
        | TG1[shift1] << 30
        | tbi0 << 37
        | tbi1 << 38
        | ds << 59
    )


class Tables:
    """Stage-1 tables for one half of the address space, built in guest memory."""

    def __init__(
        self, mem: gm.GuestMemory, shift: int, input_bits: int, pool: int, page: int = PAGE
    ) -> None:
        self.mem, self.shift, self.input_bits, self.page = mem, shift, input_bits, page
        self.start = START_LEVEL[shift, input_bits]
        self._next, self._end = pool, pool + POOL_SIZE
        self.root = self._new_table()

    def _new_table(self) -> int:
        table = self._next
        self._next += 1 << self.shift
        assert self._next <= self._end, "the test's table pool is too small"
        return table

    def _index(self, va: int, level: int) -> int:
        low = LOW_BIT[self.shift][level]
        high = self.input_bits if level == self.start else LOW_BIT[self.shift][level - 1]
        return va >> low & ((1 << (high - low)) - 1)

    def read(self, address: int) -> int:
        return int.from_bytes(self.mem.read(address, 8, access=gm.Access.DEBUG), "little")

    def write(self, address: int, desc: int) -> None:
        self.mem.write(address, desc.to_bytes(8, "little"), access=gm.Access.DEBUG)

    def slot(self, va: int, level: int, *, grow: bool = False) -> int:
        """The address of ``va``'s descriptor at ``level``, making tables above it if ``grow``."""
        table = self.root
        for above in range(self.start, level):
            entry = table + 8 * self._index(va, above)
            desc = self.read(entry)
            if desc & 0b11 != 0b11:
                assert grow, f"no level {above} table for {va:#x}"
                desc = self._new_table() | TABLE
                self.write(entry, desc)
            table = desc & PA_MASK & ~((1 << self.shift) - 1)
        return table + 8 * self._index(va, level)

    def map(self, va: int, pa: int, level: int = 3) -> None:
        """Map ``va``'s page (or its block, at a level above 3) to ``pa``."""
        self.write(self.slot(va, level, grow=True), pa | (self.page if level == 3 else BLOCK))


@pytest.fixture
def mem() -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.anonymous(RAM, gpa=BASE, tags=gm.TagMode.SOFTWARE) as memory:
        yield memory


def regs(tcr_value: int, ttbr0: int = 0, ttbr1: int = 0) -> TranslationRegs:
    return TranslationRegs(sctlr=SCTLR_MMU_ON, tcr=tcr_value, ttbr0=ttbr0, ttbr1=ttbr1)


def upper_va(input_bits: int, low: int) -> int:
    """The TTBR1-half address whose bits below ``input_bits`` are ``low``."""
    return ((1 << 64) - (1 << input_bits)) | low


# ---- the walk, descriptor by descriptor -----------------------------------------


def test_a_4k_walk_reads_the_descriptors_the_architecture_names(mem: gm.GuestMemory) -> None:
    # VA 0x80_4020_1123: index 1 at every level of a 4-level 4K walk, offset 0x123.
    root, l1, l2, l3 = POOL0, POOL0 + 0x1000, POOL0 + 0x2000, POOL0 + 0x3000
    for entry, desc in [(root + 8, l1 | 3), (l1 + 8, l2 | 3), (l2 + 8, l3 | 3)]:
        mem.write(entry, desc.to_bytes(8, "little"))
    mem.write(l3 + 8, (0x1234_5678_9000 | PAGE).to_bytes(8, "little"))
    assert translate(mem, regs(tcr(), ttbr0=root), 0x80_4020_1123) == 0x1234_5678_9123
    with pytest.raises(TranslationError) as info:
        translate(mem, regs(tcr(), ttbr0=root), 0x80_4020_0123)  # index 0 at level 3
    assert info.value.level == 3


CONFIGS = [  # (granule shift, input bits, TTBR1's half?)
    (12, 48, False),
    (12, 48, True),
    (12, 39, False),
    (12, 39, True),
    (14, 47, False),
    (14, 48, False),
    (14, 47, True),
    (16, 48, False),
    (16, 48, True),
    (16, 42, False),
]


def make_tables(
    mem: gm.GuestMemory, shift: int, input_bits: int, upper: bool
) -> tuple[Tables, TranslationRegs]:
    lpa2 = input_bits > 48  # 52-bit addresses need TCR_EL1.DS and its descriptor format
    tables = Tables(mem, shift, input_bits, POOL1 if upper else POOL0, LPA2_PAGE if lpa2 else PAGE)
    if upper:
        value = tcr(t1sz=64 - input_bits, shift1=shift, epd0=True, ds=lpa2)
        return tables, regs(value, ttbr1=tables.root)
    value = tcr(t0sz=64 - input_bits, shift0=shift, epd1=True, ds=lpa2)
    return tables, regs(value, ttbr0=tables.root)


@pytest.mark.parametrize(("shift", "input_bits", "upper"), CONFIGS)
def test_pages_translate_for_each_granule_and_input_size(
    mem: gm.GuestMemory, shift: int, input_bits: int, upper: bool
) -> None:
    page = 1 << shift
    low = (1 << (input_bits - 1)) + 5 * page  # a high address: every index bit in play
    va = upper_va(input_bits, low) if upper else low
    tables, r = make_tables(mem, shift, input_bits, upper)
    tables.map(va, 0x8765_4321_0000)
    tables.map(va + page, 0x1000_0000)
    assert translate(mem, r, va) == 0x8765_4321_0000
    assert translate(mem, r, va + page - 1) == 0x8765_4321_0000 + page - 1
    assert translate(mem, r, va + page + 0x10) == 0x1000_0010
    with pytest.raises(TranslationError) as info:
        translate(mem, r, va + 2 * page)
    assert info.value.level == 3
    assert info.value.address == va + 2 * page


@pytest.mark.parametrize(("shift", "input_bits", "upper"), CONFIGS)
def test_an_empty_root_faults_at_the_start_level(
    mem: gm.GuestMemory, shift: int, input_bits: int, upper: bool
) -> None:
    _, r = make_tables(mem, shift, input_bits, upper)
    va = upper_va(input_bits, 0x1000) if upper else 0x1000
    with pytest.raises(TranslationError) as info:
        translate(mem, r, va)
    assert info.value.level == START_LEVEL[shift, input_bits]


def test_a_kernel_address_goes_through_ttbr1(mem: gm.GuestMemory) -> None:
    user, kernel = Tables(mem, 12, 48, POOL0), Tables(mem, 12, 48, POOL1)
    user.map(0x40_0000, 0x4123_4000)
    kernel.map(0xFFFF_8000_0040_0000, 0x4567_8000)
    r = regs(tcr(), ttbr0=user.root, ttbr1=kernel.root)
    assert translate(mem, r, 0x40_0ABC) == 0x4123_4ABC
    assert translate(mem, r, 0xFFFF_8000_0040_0ABC) == 0x4567_8ABC
    with pytest.raises(TranslationError):  # only TTBR0 maps it
        translate(mem, r, 0xFFFF_0000_0040_0ABC)


def test_the_ttbr_asid_and_cnp_bits_are_not_the_table_address(mem: gm.GuestMemory) -> None:
    tables = Tables(mem, 12, 48, POOL0)
    tables.map(0x5000, 0x6000)
    r = regs(tcr(), ttbr0=0x1234 << 48 | tables.root | 1)
    assert translate(mem, r, 0x5008) == 0x6008


# ---- blocks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shift", "input_bits", "level", "size"),
    [(12, 48, 1, 1 << 30), (12, 48, 2, 2 << 20), (12, 39, 1, 1 << 30), (14, 47, 2, 32 << 20)],
)
def test_a_block_maps_its_whole_size(
    mem: gm.GuestMemory, shift: int, input_bits: int, level: int, size: int
) -> None:
    tables, r = make_tables(mem, shift, input_bits, upper=False)
    va, pa = 3 * size, 0x80 * size
    tables.map(va, pa, level)
    tables.map(va + size, 0x4000_0000)
    assert translate(mem, r, va) == pa
    assert translate(mem, r, va + size // 2 + 0x10) == pa + size // 2 + 0x10
    assert translate(mem, r, va + size - 1) == pa + size - 1
    assert translate(mem, r, va + size + 0x10) == 0x4000_0010  # the next one is a page
    assert ranges(mem, r, va + size - 0x10, 0x20) == [(pa + size - 0x10, 0x10), (0x4000_0000, 0x10)]


@pytest.mark.parametrize(("shift", "input_bits", "level"), [(12, 48, 0), (14, 48, 1), (14, 48, 0)])
def test_a_block_where_the_granule_allows_none_faults(
    mem: gm.GuestMemory, shift: int, input_bits: int, level: int
) -> None:
    tables, r = make_tables(mem, shift, input_bits, upper=False)
    tables.map(0, 0, level)
    with pytest.raises(TranslationError, match=f"level {level} descriptor is a block") as info:
        translate(mem, r, 0x10)
    assert info.value.level == level


def test_64k_descriptors_bits_15_12_are_not_address_bits(mem: gm.GuestMemory) -> None:
    # With FEAT_LPA they would carry bits 51:48 of a 52-bit address: unsupported, so ignored.
    tables, r = make_tables(mem, 16, 48, upper=False)
    tables.map(0x12_3456_0000, 0x4_0000)
    tables.map(0x12_3457_0000, 0x5_0000)
    for va in (0x12_3456_0000, 0x12_3457_0000):
        for level in (1, 2, 3):
            slot = tables.slot(va, level)
            tables.write(slot, tables.read(slot) | 0xF000)
    assert translate(mem, r, 0x12_3456_0010) == 0x4_0010
    assert ranges(mem, r, 0x12_3456_FFF0, 0x20) == [(0x4_FFF0, 0x20)]


def test_a_level_3_descriptor_of_block_form_is_invalid(mem: gm.GuestMemory) -> None:
    tables, r = make_tables(mem, 12, 48, upper=False)
    tables.map(0x7000, 0x9000)
    tables.write(tables.slot(0x7000, 3), 0x9000 | BLOCK)
    with pytest.raises(TranslationError, match="level 3 descriptor invalid") as info:
        translate(mem, r, 0x7000)
    assert info.value.level == 3


# ---- tagged pointers and the top byte ----------------------------------------------


def test_tbi_ignores_an_mte_tag_in_the_top_byte(mem: gm.GuestMemory) -> None:
    user, kernel = Tables(mem, 12, 48, POOL0), Tables(mem, 12, 48, POOL1)
    user.map(0x4000_0000, 0x4010_0000)
    kernel.map(0xFFFF_8000_1234_5000, 0x4020_0000)
    r = regs(tcr(tbi0=True, tbi1=True), ttbr0=user.root, ttbr1=kernel.root)
    assert translate(mem, r, 0x0300_0000_4000_0030) == 0x4010_0030
    assert translate(mem, r, 0xF3FF_8000_1234_5040) == 0x4020_0040
    assert ranges(mem, r, 0x0300_0000_4000_0FF0, 0x10) == [(0x4010_0FF0, 0x10)]
    # Bit 55, not bit 63, picks the table: a top byte says nothing about the half.
    assert translate(mem, r, 0xF000_0000_4000_0030) == 0x4010_0030
    assert translate(mem, r, 0x0AFF_8000_1234_5040) == 0x4020_0040


@pytest.mark.parametrize(
    ("tbi0", "tbi1", "va"),
    [
        (False, True, 0x0300_0000_4000_0030),
        (True, False, 0xF3FF_8000_1234_5040),
    ],
)
def test_without_tbi_a_tagged_pointer_faults(
    mem: gm.GuestMemory, tbi0: bool, tbi1: bool, va: int
) -> None:
    user, kernel = Tables(mem, 12, 48, POOL0), Tables(mem, 12, 48, POOL1)
    user.map(0x4000_0000, 0x4010_0000)
    kernel.map(0xFFFF_8000_1234_5000, 0x4020_0000)
    r = regs(tcr(tbi0=tbi0, tbi1=tbi1), ttbr0=user.root, ttbr1=kernel.root)
    with pytest.raises(TranslationError, match="outside the 48-bit range") as info:
        translate(mem, r, va)
    assert info.value.level is None
    assert info.value.address == va


@pytest.mark.parametrize(
    ("t0sz", "va"), [(16, 0x0001_0000_0000_0000), (25, 0x80_0000_0000), (16, 0x007F_0000_0000_0000)]
)
def test_bits_above_the_input_size_must_be_zero_for_ttbr0(
    mem: gm.GuestMemory, t0sz: int, va: int
) -> None:
    tables = Tables(mem, 12, 64 - t0sz, POOL0)
    tables.map(va & ((1 << (64 - t0sz)) - 1), 0x5000)
    r = regs(tcr(t0sz=t0sz, tbi0=True), ttbr0=tables.root)
    with pytest.raises(TranslationError) as info:
        translate(mem, r, va)
    assert info.value.level is None


def test_bits_above_the_input_size_must_be_ones_for_ttbr1(mem: gm.GuestMemory) -> None:
    tables = Tables(mem, 12, 39, POOL1)
    tables.map(upper_va(39, 0x1000), 0x5000)
    r = regs(tcr(t1sz=25), ttbr1=tables.root)
    assert translate(mem, r, 0xFFFF_FF80_0000_1004) == 0x5004
    with pytest.raises(TranslationError, match="outside the 39-bit range of TTBR1"):
        translate(mem, r, 0xFFFF_FF00_0000_1004)


# ---- the MMU off --------------------------------------------------------------------


def test_with_the_mmu_off_addresses_are_physical(mem: gm.GuestMemory) -> None:
    r = TranslationRegs(sctlr=SCTLR_MMU_OFF, tcr=tcr(), ttbr0=0xDEAD_0000, ttbr1=0xBEEF_0000)
    assert translate(mem, r, 0x4000_0123) == 0x4000_0123
    assert translate(mem, r, 0xFFFF_FFFF_FFFF) == 0xFFFF_FFFF_FFFF
    assert ranges(mem, r, 0x4000_0FF0, 0x3000) == [(0x4000_0FF0, 0x3000)]
    with pytest.raises(TranslationError, match="48-bit physical"):
        translate(mem, r, 1 << 48)
    with pytest.raises(TranslationError):
        ranges(mem, r, (1 << 48) - 0x10, 0x20)


def test_with_the_mmu_off_tbi_still_drops_the_tag(mem: gm.GuestMemory) -> None:
    r = TranslationRegs(sctlr=SCTLR_MMU_OFF, tcr=tcr(tbi0=True), ttbr0=0, ttbr1=0)
    assert translate(mem, r, 0x0500_0000_4000_0010) == 0x4000_0010


# ---- faults -------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("bad", [0, 0b10, 0x4000_0000])
def test_an_invalid_descriptor_faults_at_its_level(
    mem: gm.GuestMemory, level: int, bad: int
) -> None:
    tables, r = make_tables(mem, 12, 48, upper=False)
    va = 0x0000_7F12_3456_7000
    tables.map(va, 0x4000_0000)
    assert translate(mem, r, va + 8) == 0x4000_0008
    tables.write(tables.slot(va, level), bad)
    with pytest.raises(TranslationError) as info:
        translate(mem, r, va + 8)
    assert info.value.level == level
    assert info.value.address == va + 8
    assert str(info.value) == (
        f"guest virtual address {va + 8:#x} is not mapped (level {level} descriptor invalid)"
    )
    assert isinstance(info.value, gm.GuestMemoryError)
    assert isinstance(info.value, ValueError)


def test_a_table_outside_guest_ram_faults(mem: gm.GuestMemory) -> None:
    tables, r = make_tables(mem, 12, 48, upper=False)
    tables.map(0x2000, 0x3000)
    tables.write(tables.slot(0x2000, 1), 0x1_0000_0000 | TABLE)  # level 2 table not in RAM
    with pytest.raises(TranslationError, match="level 2 descriptor at IPA 0x100000000") as info:
        translate(mem, r, 0x2000)
    assert info.value.level == 2
    assert isinstance(info.value.__cause__, gm.AddressError)


def test_a_ttbr_outside_guest_ram_faults(mem: gm.GuestMemory) -> None:
    with pytest.raises(TranslationError, match="outside guest RAM") as info:
        translate(mem, regs(tcr(), ttbr0=0x1000), 0x2000)
    assert info.value.level == 0
    assert isinstance(info.value.__cause__, gm.AddressError)


def test_epd_disables_walks_of_its_half(mem: gm.GuestMemory) -> None:
    user, kernel = Tables(mem, 12, 48, POOL0), Tables(mem, 12, 48, POOL1)
    user.map(0x1000, 0x5000)
    kernel.map(0xFFFF_0000_0000_1000, 0x6000)
    no_user = regs(tcr(epd0=True), user.root, kernel.root)
    no_kernel = regs(tcr(epd1=True), user.root, kernel.root)
    neither = regs(tcr(epd0=True, epd1=True), user.root, kernel.root)
    for r in (no_user, neither):
        with pytest.raises(TranslationError, match="EPD0") as info:
            translate(mem, r, 0x1000)
        assert info.value.level is None
    for r in (no_kernel, neither):
        with pytest.raises(TranslationError, match="EPD1"):
            translate(mem, r, 0xFFFF_0000_0000_1000)
    assert translate(mem, no_user, 0xFFFF_0000_0000_1001) == 0x6001
    assert translate(mem, no_kernel, 0x1001) == 0x5001


def test_52_bit_virtual_addresses_need_lpa2(mem: gm.GuestMemory) -> None:
    tables = Tables(mem, 12, 48, POOL0)
    tables.map(0x1000, 0x5000)
    with pytest.raises(gm.UnsupportedError, match=r"T0SZ = 12.*FEAT_LPA2"):
        translate(mem, regs(tcr(t0sz=12), tables.root), 0x1000)
    with pytest.raises(gm.UnsupportedError, match="T0SZ = 11"):
        translate(mem, regs(tcr(t0sz=11, ds=True), tables.root), 0x1000)


@pytest.mark.parametrize(("shift", "upper"), [(12, False), (12, True), (14, False), (14, True)])
def test_lpa2_walks_52_bit_addresses(mem: gm.GuestMemory, shift: int, upper: bool) -> None:
    # Linux 6.12 built for 52-bit addresses, on a CPU with FEAT_LPA2: DS set, TnSZ 12.
    page = 1 << shift
    tables = Tables(mem, shift, 52, POOL1 if upper else POOL0, page=LPA2_PAGE)
    low = (1 << 51) + 5 * page  # VA bit 51: only a 52-bit walk resolves it
    va = upper_va(52, low) if upper else low
    if upper:
        r = regs(tcr(t1sz=12, shift1=shift, epd0=True, ds=True), ttbr1=tables.root)
    else:
        r = regs(tcr(t0sz=12, shift0=shift, epd1=True, ds=True), ttbr0=tables.root)
    with pytest.raises(TranslationError) as info:
        translate(mem, r, va)
    assert info.value.level == START_LEVEL[shift, 52]  # -1 for 4 KiB: a 5-level walk
    tables.map(va, 0x8765_4321_0000)
    tables.map(va + page, 0x1000_0000 | 0b10 << 8)  # descriptor bits 9:8 -> OA bits 51:50
    assert translate(mem, r, va + 0x10) == 0x8765_4321_0010
    assert translate(mem, r, va + page + 1) == 1 << 51 | 0x1000_0001


def test_lpa2_takes_the_table_base_bits_51_48_from_ttbr_bits_5_2(mem: gm.GuestMemory) -> None:
    tables = Tables(mem, 12, 48, POOL0, page=LPA2_PAGE)
    tables.map(0x1000, 0x5000)
    value = tcr(ds=True)
    assert translate(mem, regs(value, ttbr0=tables.root), 0x1234) == 0x5234
    with pytest.raises(TranslationError, match="outside guest RAM") as info:
        translate(mem, regs(value, ttbr0=tables.root | 0b0001 << 2), 0x1234)  # base + 2**48
    assert info.value.level == 0


def test_lpa2_allows_a_level_0_block_for_4k(mem: gm.GuestMemory) -> None:
    tables = Tables(mem, 12, 48, POOL0, page=LPA2_PAGE)
    tables.write(tables.slot(0x80_0000_1234, 0), 1 << 39 | BLOCK & ~(3 << 8))
    assert translate(mem, regs(tcr(ds=True), ttbr0=tables.root), 0x80_0000_1234) == (
        1 << 39 | 0x1234
    )
    with pytest.raises(TranslationError, match="block"):
        translate(mem, regs(tcr(), ttbr0=tables.root), 0x80_0000_1234)


def test_a_reserved_granule_or_input_size_faults(mem: gm.GuestMemory) -> None:
    tables = Tables(mem, 12, 48, POOL0)
    tables.map(0x1000, 0x5000)
    with pytest.raises(TranslationError, match="TG0 = 3"):
        translate(mem, regs(tcr() | 3 << 14, tables.root), 0x1000)
    with pytest.raises(TranslationError, match="TG1 = 0"):
        translate(mem, regs(tcr() & ~(3 << 30), tables.root), 0xFFFF_0000_0000_1000)
    with pytest.raises(TranslationError, match="T0SZ = 49"):
        translate(mem, regs(tcr(t0sz=49), tables.root), 0x1000)


@pytest.mark.parametrize("va", [-1, 1 << 64])
def test_an_address_outside_64_bits_is_refused(mem: gm.GuestMemory, va: int) -> None:
    with pytest.raises(TranslationError):
        translate(mem, regs(tcr()), va)


def test_a_non_integer_address_is_refused(mem: gm.GuestMemory) -> None:
    with pytest.raises(gm.ArgumentTypeError):
        translate(mem, regs(tcr()), 1.5)  # type: ignore[arg-type]
    with pytest.raises(gm.ArgumentTypeError):
        ranges(mem, regs(tcr()), 0, True)


# ---- ranges ---------------------------------------------------------------------------


def test_ranges_split_where_pages_end_and_merge_contiguous_frames(mem: gm.GuestMemory) -> None:
    tables, r = make_tables(mem, 12, 48, upper=False)
    tables.map(0x10_0000, 0x4000_5000)
    tables.map(0x10_1000, 0x4000_6000)  # follows the first frame
    tables.map(0x10_2000, 0x4000_1000)  # does not
    assert ranges(mem, r, 0x10_0800, 0x1800) == [(0x4000_5800, 0x1800)]
    assert ranges(mem, r, 0x10_0800, 0x1900) == [(0x4000_5800, 0x1800), (0x4000_1000, 0x100)]
    assert ranges(mem, r, 0x10_1800, 0x1000) == [(0x4000_6800, 0x800), (0x4000_1000, 0x800)]
    assert ranges(mem, r, 0x10_2FFF, 1) == [(0x4000_1FFF, 1)]
    assert ranges(mem, r, 0x10_0000, 0) == []


def test_ranges_fault_at_the_first_unmapped_page(mem: gm.GuestMemory) -> None:
    tables, r = make_tables(mem, 16, 48, upper=False)
    tables.map(0x3_0000, 0x4001_0000)
    with pytest.raises(TranslationError) as info:
        ranges(mem, r, 0x3_FFF0, 0x20)
    assert info.value.address == 0x4_0000
    assert info.value.level == 3


def test_ranges_that_wrap_past_2_64_are_refused(mem: gm.GuestMemory) -> None:
    with pytest.raises(TranslationError, match="wraps past 2\\*\\*64"):
        ranges(mem, regs(tcr()), (1 << 64) - 0x10, 0x20)
    with pytest.raises(gm.LengthError):
        ranges(mem, regs(tcr()), 0x1000, -1)


# ---- any pages to any frames --------------------------------------------------------

PROPERTY_CONFIGS = list(START_LEVEL)


@given(
    config=st.sampled_from(PROPERTY_CONFIGS),
    upper=st.booleans(),
    data=st.data(),
)
def test_random_pages_translate_to_their_frames(
    config: tuple[int, int], upper: bool, data: st.DataObject
) -> None:
    shift, input_bits = config
    page = 1 << shift
    last_vpn = (1 << (input_bits - shift)) - 1
    # Pages anywhere, and pages near either end, which share tables.
    vpns = st.integers(0, last_vpn) | st.integers(0, 40) | st.integers(last_vpn - 40, last_vpn)
    mapping = data.draw(
        st.dictionaries(vpns, st.integers(0, (1 << (48 - shift)) - 1), min_size=1, max_size=8)
    )
    unmapped = data.draw(vpns.filter(lambda vpn: vpn not in mapping))
    offset = data.draw(st.integers(0, page - 1))

    def va_of(vpn: int) -> int:
        return upper_va(input_bits, vpn << shift) if upper else vpn << shift

    with gm.GuestMemory.anonymous(RAM, gpa=BASE, tags=gm.TagMode.SOFTWARE) as memory:
        tables, r = make_tables(memory, shift, input_bits, upper)
        for vpn, pfn in mapping.items():
            tables.map(va_of(vpn), pfn << shift)
        for vpn, pfn in mapping.items():
            va = va_of(vpn)
            assert translate(memory, r, va + offset) == (pfn << shift) + offset
            assert ranges(memory, r, va + offset, page - offset) == [
                ((pfn << shift) + offset, page - offset)
            ]
        with pytest.raises(TranslationError) as info:
            translate(memory, r, va_of(unmapped) + offset)
        assert info.value.address == va_of(unmapped) + offset
        assert info.value.level is not None
        assert START_LEVEL[shift, input_bits] <= info.value.level <= 3
