"""The framing and field encoding of saved machine state (guestmem.vmm.state_codec).

Sections go in and come out by name; every way a state can be damaged
(magic, version, reserved field, checksum, a cut anywhere, a section twice,
bytes left over) is a StateError with the offset, never another exception.
"""

from __future__ import annotations

import struct
import zlib

import pytest

import guestmem as gm
from guestmem.saved_state import Reader, StateError, Writer
from guestmem.vmm import state_codec as codec

SECTIONS = [
    ("vcpu0", Writer().u8(1).u16(0xBEEF).u32(7).u64(1 << 63).bytes()),
    ("uart", Writer().u8(1).blob(b"typed").u8(1).bytes()),
    ("empty", b""),
]


def reframed(body: bytes) -> bytes:
    """``body`` with a correct checksum after it, so a check past the checksum is reached."""
    return body + struct.pack("<I", zlib.crc32(body))


def test_sections_and_their_fields_come_back() -> None:
    sections = codec.decode(codec.encode(SECTIONS))
    assert list(sections) == ["vcpu0", "uart", "empty"]
    vcpu = codec.section(sections, "vcpu0")
    assert vcpu.version("a vCPU", 1) == 1
    assert (vcpu.u16(), vcpu.u32(), vcpu.u64()) == (0xBEEF, 7, 1 << 63)
    vcpu.end()
    uart = codec.section(sections, "uart")
    assert uart.u8() == 1 and uart.blob() == b"typed" and uart.flag("a flag") is True
    uart.end()
    assert codec.section(sections, "empty").left == 0


def test_a_missing_section_is_named() -> None:
    with pytest.raises(StateError, match="no section 'gic'"):
        codec.section(codec.decode(codec.encode(SECTIONS)), "gic")


def test_a_readers_errors_carry_the_offset_in_the_whole_state() -> None:
    state = codec.encode(SECTIONS)
    uart = codec.decode(state)["uart"]
    start = state.index(b"\x01\x05\x00\x00\x00typed")
    uart.u8()
    uart.blob()
    with pytest.raises(StateError) as caught:
        uart.u16()  # one byte left: the flag
    assert caught.value.offset == start + 10 and "truncated" in caught.value.reason


def test_bad_magic_version_and_reserved_field_are_refused() -> None:
    state = codec.encode(SECTIONS)
    with pytest.raises(StateError, match="not a guestmem machine state"):
        codec.decode(b"X" + state[1:])
    with pytest.raises(StateError, match="format version 2") as caught:
        codec.decode(state[:8] + struct.pack("<H", 2) + state[10:])
    assert caught.value.offset == 8
    with pytest.raises(StateError, match="reserved field is 1"):
        codec.decode(state[:10] + struct.pack("<H", 1) + state[12:])


def test_a_flipped_bit_fails_the_checksum() -> None:
    state = bytearray(codec.encode(SECTIONS))
    state[len(state) // 2] ^= 0x10
    with pytest.raises(StateError, match="checksum mismatch"):
        codec.decode(bytes(state))


def test_every_truncation_is_refused() -> None:
    state = codec.encode(SECTIONS)
    for cut in range(len(state)):
        with pytest.raises(StateError):
            codec.decode(state[:cut])


def test_a_section_count_beyond_the_sections_is_a_truncation() -> None:
    body = codec.encode(SECTIONS)[:-4]
    more = body[:12] + struct.pack("<I", len(SECTIONS) + 1) + body[16:]
    with pytest.raises(StateError, match="truncated"):
        codec.decode(reframed(more))


def test_a_section_twice_is_refused() -> None:
    with pytest.raises(StateError, match="section 'uart' appears twice"):
        codec.decode(codec.encode([*SECTIONS, ("uart", b"")]))


def test_bytes_after_the_last_section_are_refused() -> None:
    body = codec.encode(SECTIONS)[:-4]
    with pytest.raises(StateError, match="1 unexpected bytes"):
        codec.decode(reframed(body + b"\0"))


@pytest.mark.parametrize("name", ["", "tab\there", "caf\xe9"], ids=["empty", "control", "latin1"])
def test_a_section_name_that_is_not_printable_ascii_is_refused(name: str) -> None:
    label = name.encode("latin-1")
    header = struct.pack("<8sHHI", codec.MAGIC, codec.VERSION, 0, 1)
    body = header + bytes([len(label)]) + label + struct.pack("<I", 0)
    with pytest.raises(StateError, match="not printable ASCII"):
        codec.decode(reframed(body))


def test_too_many_sections_are_refused_both_ways() -> None:
    with pytest.raises(ValueError, match="sections"):
        codec.encode([(f"s{i}", b"") for i in range(codec.MAX_SECTIONS + 1)])
    header = struct.pack("<8sHHI", codec.MAGIC, codec.VERSION, 0, codec.MAX_SECTIONS + 1)
    with pytest.raises(StateError, match="sections, more than"):
        codec.decode(reframed(header))


def test_a_readers_checked_fields() -> None:
    with pytest.raises(StateError, match="part state version 3; this VMM reads 1 to 2"):
        Reader(b"\x03").version("part", 2)
    with pytest.raises(StateError, match="state version 0"):
        Reader(b"\x00").version("part", 2)
    with pytest.raises(StateError, match="a flag is 2, not 0 or 1"):
        Reader(b"\x02").flag("a flag")
    with pytest.raises(StateError, match="more than the 4 allowed"):
        Reader(Writer().blob(b"12345").bytes()).blob("five bytes", limit=4)
    with pytest.raises(StateError, match="the size is 3 in the saved state, 4 here"):
        Reader(b"").expect("the size", 3, 4)
    with pytest.raises(StateError, match="2 unexpected bytes"):
        Reader(b"ab").end()
    reader = Reader(b"\x01", base=100)
    reader.u8()
    with pytest.raises(StateError) as caught:
        reader.u8()
    assert caught.value.offset == 101


def test_a_nested_readers_errors_count_from_the_start_of_the_whole_state() -> None:
    inner = Writer().u8(7).u16(1).bytes()
    outer = Reader(Writer().u32(0xAAAA_AAAA).blob(inner).bytes(), base=100)
    outer.u32()
    nested = outer.nested("the inner part", limit=3)
    outer.end()
    assert nested.offset == 108 and nested.u8() == 7 and nested.offset == 109
    with pytest.raises(StateError) as caught:
        nested.u32()
    assert caught.value.offset == 109 and "truncated" in caught.value.reason
    with pytest.raises(StateError, match="more than the 2 allowed") as caught:
        Reader(Writer().blob(inner).bytes(), base=10).nested("it", limit=2)
    assert caught.value.offset == 14


def test_a_state_error_is_a_guestmem_error_and_a_value_error() -> None:
    error = StateError(5, "why")
    assert isinstance(error, gm.GuestMemoryError) and isinstance(error, ValueError)
    assert str(error) == "machine state at byte 5: why"
