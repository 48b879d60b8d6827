"""Soak: 100,000 mutated migration streams and 100,000 mutated GDB packets.

Outside the default run: `pytest -m soak` (about 10 s on the host; the host
lane runs it after the suite).
Every input is answered or refused as documented — a StreamError, an RSP
error or empty reply — and nothing else ever escapes; the counts are printed.
"""

from __future__ import annotations

import io
import os
import random
import re
from collections import Counter

import pytest

import guestmem as gm
from guestmem import migration
from guestmem.gdbstub.packets import Packet, PacketReader, frame
from guestmem.gdbstub.session import Session

pytestmark = pytest.mark.soak
COUNT = int(os.environ.get("GUESTMEM_SOAK_COUNT", "100000"))
LAYOUT = [(0x4000_0000, 0x8000), (0x4001_0000, 0x4000)]


def base_streams() -> list[bytes]:
    """A saved image and a live-style stream with rounds and repeated pages."""
    with gm.GuestMemory.from_layout(LAYOUT, tags="software") as mem:
        mem.write(0x4000_0000, os.urandom(5000))
        mem.set_tags(0x4000_0000, 256, list(range(16)))
        saved = io.BytesIO()
        migration.save(mem, saved)
        live = io.BytesIO()
        writer = migration.StreamWriter(mem, live)
        writer.header()
        writer.all_pages()
        writer.round()
        writer.pages(gm.Frames.of([0x4000_0000 // 4096, 0x4001_0000 // 4096], 4096))
        writer.round()
        writer.end()
        return [saved.getvalue(), live.getvalue()]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flipped bytes, a cut, a spliced run of random bytes, a duplicated slice."""
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del buf[rng.randrange(len(buf)) :]
    elif kind == 2:
        at = rng.randrange(len(buf))
        buf[at : at + rng.randint(1, 64)] = rng.randbytes(rng.randint(0, 64))
    else:
        at, n = rng.randrange(len(buf)), rng.randint(1, 300)
        buf[at:at] = buf[at : at + n]
    return bytes(buf)


def test_mutated_streams_are_restored_or_refused() -> None:
    rng = random.Random(20261125)
    outcomes: Counter[str] = Counter()
    bases = base_streams()
    with gm.GuestMemory.from_layout(LAYOUT, tags="software") as target:
        for _ in range(COUNT):
            stream = mutate(rng.choice(bases), rng)
            try:
                migration.restore(io.BytesIO(stream), target)
                outcomes["restored"] += 1
            except gm.StreamError as error:
                outcomes[re.sub(r"b'.*'|\d+", "#", error.reason)] += 1
    print(f"\n{COUNT} mutated streams: {dict(outcomes.most_common())}")
    assert sum(outcomes.values()) == COUNT
    assert outcomes["restored"] < COUNT  # the mutations did reach the checks


PACKETS = [
    b"qSupported:multiprocess+;xmlRegisters=i386;memory-tagging+",
    b"?",
    b"g",
    b"p20",
    b"m40000000,40",
    b"M40000010,4:deadbeef",
    b"X40000020,2:ab",
    b"qMemTags:40000000,40:1",
    b"QMemTags:40000000,20:1:0a0b",
    b"qIsAddressTagged:40000000",
    b"qXfer:features:read:target.xml:0,fff",
    b"vFile:setfs:0",
    b"vFile:open:2f70726f632f312f736d617073,0,0",
    b"vFile:pread:0,100,0",
    b"vFile:close:0",
    b"qAttached",
    b"qC",
    b"qfThreadInfo",
    b"D",
]


def answered(session: Session, payload: bytes) -> str:
    reply = session.handle(payload)
    if reply is None:
        return "session ended"  # k: the documented end without a reply
    if not reply:
        return "empty"
    if reply[:1] == b"E" and len(reply) == 3:
        return "error"
    return "answer"


def test_mutated_packets_are_answered_or_refused() -> None:
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    with gm.GuestMemory.from_layout(LAYOUT, tags="software") as mem:
        session = Session(mem, dict, 42)
        reader = PacketReader()
        for _ in range(COUNT):
            payload = mutate(rng.choice(PACKETS), rng)
            wire = frame(payload) if rng.random() < 0.9 else rng.randbytes(rng.randint(1, 40))
            cut = rng.randrange(len(wire) + 1)
            for event in [*reader.feed(wire[:cut]), *reader.feed(wire[cut:])]:
                if isinstance(event, Packet):
                    outcomes[answered(session, event.payload)] += 1
                    session.ended = False  # a detach or kill: carry on as the next client
                else:
                    outcomes[type(event).__name__] += 1
    print(f"\n{COUNT} mutated packets: {dict(outcomes)}")
    assert sum(outcomes.values()) >= COUNT * 0.9
    assert outcomes["error"] and outcomes["answer"]
