"""Soak: 100,000 mutated migration streams and 100,000 mutated GDB packets, and
1,000 vhost-user sessions with one mutated message each.

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
import socket
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


VHOST_SESSIONS = int(os.environ.get("GUESTMEM_SOAK_VHOST_SESSIONS", "1000"))


def test_vhost_user_sessions_with_one_mutated_message(tmp_path: object) -> None:
    """QEMU's set-up of a ring with one message mutated: served, or refused with a typed error.

    After a real negotiation, the memory table and the ring's messages are
    sent with one of them mutated (bits, length, fds or flags), then a
    request is kicked. Nothing escapes but guestmem errors, nothing is
    written outside the memory table, and each session ends cleanly.
    """
    from pathlib import Path

    from guestmem.vhost_user.protocol import U64, VERSION, VRING_ADDR, VRING_STATE, Request
    from vhost_user_frontend import (
        QUEUE_SIZE,
        Frontend,
        memory_table_payload,
        region_entries,
        start_backend,
        user,
    )

    disk = Path(str(tmp_path)) / "disk.img"
    disk.write_bytes(bytes(64 * 512))
    rng = random.Random(21)
    outcomes: Counter[str] = Counter()
    for _ in range(VHOST_SESSIONS):
        sock, backend = start_backend(str(disk))
        front = Frontend(sock)
        desc, avail, used = front.driver.rings()
        script: list[tuple[int, bytes, list[int], int]] = [
            (
                Request.SET_MEM_TABLE,
                memory_table_payload(region_entries()),
                [front.fd] * 2,
                VERSION,
            ),
            (Request.SET_VRING_NUM, VRING_STATE.pack(0, QUEUE_SIZE), [], VERSION),
            (Request.SET_VRING_BASE, VRING_STATE.pack(0, 0), [], VERSION),
            (
                Request.SET_VRING_ADDR,
                VRING_ADDR.pack(0, 0, user(desc), user(used), user(avail), used),
                [],
                VERSION,
            ),
            (Request.SET_VRING_KICK, U64.pack(0), [front.kick], VERSION),
            (Request.SET_VRING_CALL, U64.pack(0), [front.call], VERSION),
            (Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1), [], VERSION),
        ]
        victim = rng.randrange(len(script))
        request, payload, fds, flags = script[victim]
        kind = rng.randrange(4)
        if kind == 0:
            data = bytearray(payload)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            payload = bytes(data)
        elif kind == 1:
            payload = payload[: rng.randrange(len(payload) + 1)] + rng.randbytes(rng.randint(0, 8))
        elif kind == 2:
            fds = [front.kick] * rng.randint(0, 3)
        else:
            flags = rng.choice([0, 2, 3, VERSION | 4, VERSION | 0x10])
        script[victim] = (request, payload, fds, flags)
        try:
            offered = front.negotiate()
            front.set_features(offered & ~(1 << 26))
            for request, payload, fds, flags in script:
                front.send(request, payload, fds, flags=flags)
            front.driver.set_desc(0, 0x30000, 16)
            front.driver.publish(0)
            os.eventfd_write(front.kick, 1)
            front.send(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0))
            front.sock.shutdown(socket.SHUT_WR)  # the backend ends the session at our EOF
            front.sock.settimeout(5)
            while front.sock.recv(1 << 16):
                pass
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            gap_ok = front.gap_is_untouched()
            front.close()
            backend.join()
        assert gap_ok
        for error in backend.errors:
            assert isinstance(error, gm.GuestMemoryError), repr(error)
        outcomes[type(backend.errors[0]).__name__ if backend.errors else "served"] += 1
    print(f"\nvhost-user sessions with one mutated message: {dict(outcomes)}")
    assert sum(outcomes.values()) == VHOST_SESSIONS
