"""RSP framing: checksums, escaping, and a reader that survives any byte stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from guestmem.gdbstub.packets import (
    Ack,
    BadPacket,
    Interrupt,
    Nak,
    Packet,
    PacketReader,
    checksum,
    escape,
    frame,
    unescape,
)

payloads = st.binary(max_size=300).filter(lambda p: b"$" not in p and b"#" not in p)


def test_frame_carries_the_modulo_256_sum() -> None:
    assert frame(b"OK") == b"$OK#9a"
    assert checksum(b"\xff\x02") == 0x01


@given(st.binary(max_size=500))
def test_escape_round_trips_and_hides_special_bytes(data: bytes) -> None:
    escaped = escape(data)
    assert not set(escaped) & set(b"#$*")
    assert unescape(escaped) == data


def test_a_dangling_escape_is_a_protocol_error() -> None:
    with pytest.raises(gm.ProtocolError):
        unescape(b"abc}")


@given(st.lists(payloads, max_size=8), st.data())
def test_any_chunking_yields_the_same_packets(packets: list[bytes], data: st.DataObject) -> None:
    stream = b"+".join(frame(p) for p in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = PacketReader()
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events += reader.feed(stream[start:end])
    assert [e.payload for e in events if isinstance(e, Packet)] == packets
    assert sum(isinstance(e, Ack) for e in events) == max(0, len(packets) - 1)


def test_acks_naks_interrupts_and_noise() -> None:
    events = PacketReader().feed(b"+-\x03xyz$g#67")
    assert events == [Ack(), Nak(), Interrupt(), Packet(b"g")]


def test_a_bad_checksum_is_reported_and_the_next_packet_is_read() -> None:
    events = PacketReader().feed(b"$g#00$g#67$g#zz")
    assert isinstance(events[0], BadPacket) and "checksum" in events[0].reason
    assert events[1] == Packet(b"g")
    assert isinstance(events[2], BadPacket)


def test_a_packet_restarted_midway_is_dropped() -> None:
    events = PacketReader().feed(b"$m4000$g#67")
    assert isinstance(events[0], BadPacket)
    assert events[1] == Packet(b"g")


def test_an_oversized_packet_is_refused_without_buffering_it() -> None:
    reader = PacketReader(limit=64)
    events = reader.feed(b"$" + b"a" * 200)
    events += reader.feed(b"a" * 200)
    assert len(reader._buffer) <= 66
    events += reader.feed(b"#00$g#67")
    assert isinstance(events[0], BadPacket) and "longer" in events[0].reason
    assert events[1:] == [Packet(b"g")]


@given(st.lists(st.binary(max_size=200), max_size=10))
def test_random_bytes_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    reader = PacketReader(limit=128)
    for chunk in chunks:
        for event in reader.feed(chunk):
            assert isinstance(event, Packet | BadPacket | Ack | Nak | Interrupt)
        assert len(reader._buffer) <= 128 + 3 + max(map(len, chunks))
