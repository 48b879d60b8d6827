"""The stub's commands in every tag mode, over a real socket: memory and tags
through the DEBUG access class, and bad input answered with an error reply
that changes nothing and leaves the session going."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from conftest import BASE, HOLE, LAYOUT, assert_unchanged, snapshot
from guestmem.gdbstub import GdbStub, RemoteAddressError
from guestmem.gdbstub.commands import MAX_OPEN_FILES
from guestmem.gdbstub.packets import Ack, Nak, Packet, PacketReader, escape, frame, unescape
from guestmem.gdbstub.session import Session
from guestmem.gdbstub.smaps import smaps_text
from guestmem.gdbstub.target import TARGET_XML
from guestmem.gdbstub.wire import BUSY_REPLY, MAX_REFUSING, REFUSAL_WAIT, is_loopback

CORPUS = Path(__file__).parent / "corpus" / "rsp"


class Client:
    """A minimal RSP client: send a packet, get the reply (acks checked)."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.reader = PacketReader(limit=1 << 22)
        self.pending: list[object] = []
        self.no_ack = False

    def events(self) -> object:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the stub closed the connection")
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ask(self, payload: bytes) -> bytes:
        self.raw(frame(payload))
        if not self.no_ack:
            assert self.events() == Ack()
        reply = self.events()
        assert isinstance(reply, Packet), reply
        if not self.no_ack:
            self.raw(b"+")
        return reply.payload

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stub(mem: gm.GuestMemory) -> Iterator[GdbStub]:
    if mem.tag_mode is not gm.TagMode.NONE:
        mem.set_tags(BASE, 256, np.arange(16, dtype=np.uint8))
    mem.write(BASE, bytes(range(256)))
    server = GdbStub(mem)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server
    server.close()
    thread.join(timeout=30)


@pytest.fixture
def client(stub: GdbStub) -> Iterator[Client]:
    c = Client(stub.address)
    yield c
    c.close()


def test_qsupported_names_memory_tagging(client: Client) -> None:
    features = client.ask(b"qSupported:multiprocess+;xmlRegisters=i386").split(b";")
    assert b"memory-tagging+" in features
    assert b"multiprocess+" in features
    assert any(f.startswith(b"PacketSize=") for f in features)


def test_memory_reads_and_writes_keep_tags(client: Client, mem: gm.GuestMemory) -> None:
    tags = mem.get_tags(BASE, 256)
    assert client.ask(b"m%x,10" % BASE) == bytes(range(16)).hex().encode()
    assert client.ask(b"m%x,4" % (0x0A << 56 | BASE + 4)) == b"04050607"  # tagged pointer
    assert client.ask(b"M%x,3:aabbcc" % (BASE + 0x21)) == b"OK"
    binary = bytes([0x23, 0x24, 0x7D, 0x2A])
    assert client.ask(b"X%x,4:" % (BASE + 0x40) + escape(binary)) == b"OK"
    assert mem.read(BASE + 0x20, 4) == bytes([0x20, 0xAA, 0xBB, 0xCC])
    assert mem.read(BASE + 0x40, 4) == binary
    np.testing.assert_array_equal(mem.get_tags(BASE, 256), tags)


def test_a_read_stops_at_the_end_of_guest_memory(client: Client) -> None:
    end = LAYOUT[1][0] + LAYOUT[1][1]
    assert client.ask(b"m%x,20" % (end - 8)) == b"00" * 8  # up to the hole, not beyond
    assert client.ask(b"m%x,ffffffff" % BASE).startswith(bytes(range(16)).hex().encode())


def test_tags_through_qmemtags_and_qmemtags(client: Client, mem: gm.GuestMemory) -> None:
    if mem.tag_mode is gm.TagMode.NONE:
        assert client.ask(b"qMemTags:%x,20:1" % BASE) == b"m0000"
        assert client.ask(b"QMemTags:%x,20:1:0102" % BASE) == b"E16"
        assert client.ask(b"qIsAddressTagged:%x" % BASE) == b"00"
        return
    assert client.ask(b"qMemTags:%x,1:1" % (BASE + 0x35)) == b"m03"
    assert client.ask(b"qMemTags:%x,30:1" % BASE) == b"m000102"
    assert client.ask(b"QMemTags:%x,40:1:0a0b" % (BASE + 0x1000)) == b"OK"
    assert mem.get_tags(BASE + 0x1000, 0x50).tolist() == [10, 11, 10, 11, 0]
    assert client.ask(b"qIsAddressTagged:%x" % (0x05 << 56 | BASE)) == b"01"
    assert client.ask(b"qIsAddressTagged:%x" % HOLE) == b"00"


def test_a_tag_write_kvm_refuses_during_a_migration_is_e10_and_writes_nothing(
    client: Client, mem: gm.GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    if mem.tag_mode is gm.TagMode.NONE:
        pytest.skip("no tags in this mode: QMemTags is E16 whatever KVM does")
    before = mem.get_tags(BASE, 0x40).tolist()

    def busy(*args: object, **kwargs: object) -> None:
        raise gm.TagsBusyError(16, "KVM_ARM_MTE_COPY_TAGS: a live migration is running")

    monkeypatch.setattr(type(mem), "set_tags", busy)
    assert client.ask(b"QMemTags:%x,40:1:0a0b" % BASE) == b"E10"
    assert mem.get_tags(BASE, 0x40).tolist() == before
    assert client.ask(b"qMemTags:%x,1:1" % BASE) == b"m%02x" % before[0]  # reads go on


BAD_PACKETS = [
    (b"m%x,10" % HOLE, b"E0e"),
    (b"M%x,2:0102" % HOLE, b"E0e"),
    (b"mzz,10", b"E01"),
    (b"m%x" % BASE, b"E01"),
    (b"M%x,4:0102" % BASE, b"E01"),  # fewer bytes than announced
    (b"M%x,2:zzzz" % BASE, b"E01"),
    (b"X%x,2:}" % BASE, b"E01"),
    (b"m1234567890abcdef01,1", b"E01"),
    (b"QMemTags:%x,20:1:10" % BASE, b"E16"),  # tag 16
    (b"QMemTags:%x,20:1:ff" % BASE, b"E16"),  # refused, not cut to its low 4 bits
    (b"QMemTags:%x,20:1:0f10" % BASE, b"E16"),  # one bad tag: no granule changes
    (b"QMemTags:%x,20:1:" % BASE, b"E16"),
    (b"QMemTags:%x,20:1:0g" % BASE, b"E01"),
    (b"QMemTags:%x,20:2:01" % BASE, b"E16"),  # not allocation tags
    (b"qMemTags:%x,ffffffffff:1" % BASE, b"E16"),  # more granules than one reply holds
    (b"qMemTags:%x,20:1" % HOLE, b"E0e"),
    (b"p99", b"E16"),
    (b"qXfer:features:read:other.xml:0,100", b"E16"),
    (b"vFile:open:2f6574632f706173737764,0,0", b"F-1,2"),  # /etc/passwd
    (b"vFile:pread:63,10,0", b"F-1,9"),
    (b"qNotAThing", b""),
    (b"Z0,%x,4" % BASE, b"E26"),  # no run control: GDB must not write BRKs itself
    (b"z0,%x,4" % BASE, b"E26"),
    (b"Z2,%x,4" % BASE, b"E26"),
    (b"QMemTags:A,10:1:", b"E16"),  # an empty tag list (QEMU's stub crashes on it)
    (b"QMemTags:%x,10:1:" % BASE, b"E16"),
    (b"qAttached:zz", b"E01"),
    (b"qAttached:1", b"E16"),  # not our pid
    (b"qMemoryRegionInfo:", b"E01"),
    (b"qXfer:memory-map:read:other:0,10", b"E16"),
]


@pytest.mark.parametrize(("packet", "reply"), BAD_PACKETS, ids=lambda p: p[:24].decode())
def test_bad_packets_get_an_error_and_change_nothing(
    client: Client, mem: gm.GuestMemory, packet: bytes, reply: bytes
) -> None:
    before = snapshot(mem)
    assert client.ask(packet) == reply
    assert_unchanged(mem, before)
    assert client.ask(b"m%x,2" % BASE) == b"0001"  # the session goes on


def test_damaged_packets_get_a_nak_and_a_nak_gets_the_reply_again(client: Client) -> None:
    client.raw(b"$m%x,2#00" % BASE)
    assert client.events() == Nak()
    client.raw(frame(b"m%x,2" % BASE))
    assert client.events() == Ack()
    reply = client.events()
    client.raw(b"-")
    assert client.events() == reply
    client.raw(b"+")
    assert client.ask(b"?").startswith(b"T05thread:p")


def test_no_ack_mode(client: Client) -> None:
    assert client.ask(b"QStartNoAckMode") == b"OK"
    client.no_ack = True
    assert client.ask(b"m%x,1" % BASE) == b"00"


def test_registers_from_a_provider(mem: gm.GuestMemory) -> None:
    session = Session(mem, lambda: {"x0": 0x1122, "pc": 0x4000_0000, "tag_ctl": 5}, 42)
    assert session.handle(b"p0") == (0x1122).to_bytes(8, "little").hex().encode()
    assert session.handle(b"p20") == (0x4000_0000).to_bytes(8, "little").hex().encode()
    g = session.handle(b"g")
    assert g is not None and len(g) == 2 * (33 * 8 + 4 + 8)
    assert g.endswith((5).to_bytes(8, "little").hex().encode())
    assert Session(mem, dict, 42).handle(b"p0") == b"00" * 8


def test_target_description_and_smaps(client: Client, mem: gm.GuestMemory) -> None:
    xml = b""
    while True:
        chunk = client.ask(b"qXfer:features:read:target.xml:%x,200" % len(xml))
        xml += unescape(chunk[1:])
        if chunk[:1] == b"l":
            break
    assert xml == TARGET_XML
    assert b"org.gnu.gdb.aarch64.mte" in xml and b"<osabi>GNU/Linux</osabi>" in xml
    thread = client.ask(b"qC")[2:]
    pid = int(thread[1:].split(b".")[0], 16)
    path = f"/proc/{pid}/smaps".encode().hex().encode()
    fd = client.ask(b"vFile:open:" + path + b",0,1c0")
    assert fd.startswith(b"F")
    data = client.ask(b"vFile:pread:%s,4000,0" % fd[1:])
    assert unescape(data.split(b";", 1)[1]) == smaps_text(mem)
    assert client.ask(b"vFile:close:%s" % fd[1:]) == b"F0"
    tagged = mem.tag_mode is not gm.TagMode.NONE
    assert (b"VmFlags: rd wr mr mw me ac mt" in smaps_text(mem)) is tagged


def test_qattached_names_the_stubs_own_process_attached(client: Client) -> None:
    pid = client.ask(b"qC")[3:].split(b".")[0]
    assert client.ask(b"qAttached") == b"1"
    assert client.ask(b"qAttached:" + pid) == b"1"  # GDB with multiprocess+ names the pid


@pytest.mark.parametrize("ending", [b"k", b"vKill;%x" % 42, b"D", b"D;%x" % 42])
def test_kill_and_detach_end_the_session_and_leave_the_guest_as_it_was(
    mem: gm.GuestMemory, ending: bytes
) -> None:
    session = Session(mem, dict, 42)
    before = snapshot(mem)
    assert session.handle(b"Z0,%x,4" % BASE) == b"E26"
    reply = session.handle(ending)
    assert session.ended
    assert reply == (None if ending == b"k" else b"OK")
    assert_unchanged(mem, before)


def test_read_only_refuses_every_write_and_still_reads(mem: gm.GuestMemory) -> None:
    session = Session(mem, dict, 42, read_only=True)
    before = snapshot(mem)
    writes = [
        b"M%x,2:0102" % BASE,
        b"X%x,2:" % BASE + escape(b"\x01\x02"),
        b"QMemTags:%x,20:1:0102" % BASE,
    ]
    for packet in writes:
        assert session.handle(packet) == b"E0d", packet
    write_open = b"vFile:open:%s,1,1c0" % b"/proc/self/smaps".hex().encode()
    assert session.handle(write_open) == b"F-1,d"
    assert_unchanged(mem, before)
    assert session.handle(b"m%x,2" % BASE) == mem.read(BASE, 2).hex().encode()
    assert session.handle(b"qMemTags:%x,10:1" % BASE) == b"m%02x" % mem.get_tags(BASE, 16)[0]


def test_vfile_handles_are_bounded_per_session(mem: gm.GuestMemory) -> None:
    session = Session(mem, dict, 42)
    open_maps = b"vFile:open:%s,0,0" % b"/proc/42/maps".hex().encode()
    handles = [session.handle(open_maps) for _ in range(MAX_OPEN_FILES)]
    assert all(h is not None and h.startswith(b"F") and b"-" not in h for h in handles)
    assert session.handle(open_maps) == b"F-1,18"  # EMFILE
    assert handles[3] is not None
    assert session.handle(b"vFile:close:" + handles[3][1:]) == b"F0"
    assert session.handle(open_maps) == handles[3]  # the freed handle is reused


def test_sessions_end_on_k_d_or_a_closed_socket_and_the_next_one_is_served(
    stub: GdbStub,
) -> None:
    for ending in (b"k", b"D", None):
        c = Client(stub.address)
        assert c.ask(b"m%x,1" % BASE) == b"00"
        if ending is not None:
            c.raw(frame(ending))
        c.close()
    c = Client(stub.address)
    assert c.ask(b"qAttached") == b"1"
    c.close()


def test_a_unix_socket(mem: gm.GuestMemory, tmp_path: Path) -> None:
    path = str(tmp_path / "gdb.sock")
    with GdbStub(mem, unix_path=path) as server:
        thread = threading.Thread(target=server.serve, args=(1,), daemon=True)
        thread.start()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(frame(b"qAttached"))
            received = b""
            while len(received) < 6:
                received += s.recv(100)
            assert received == b"+$1#31"
            s.sendall(b"+" + frame(b"k"))
        thread.join(timeout=30)
    assert not Path(path).exists()


@pytest.mark.parametrize("entry", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.name)
def test_corpus_streams_leave_memory_and_the_stub_intact(
    stub: GdbStub, mem: gm.GuestMemory, entry: Path
) -> None:
    before = snapshot(mem)
    c = Client(stub.address)
    c.raw(entry.read_bytes())
    c.raw(b"$#00+")  # ends whatever the entry left open
    c.close()
    after = Client(stub.address)
    assert after.ask(b"m%x,2" % BASE) == b"0001"
    after.close()
    assert_unchanged(mem, before)


@given(st.binary(max_size=120))
def test_random_payloads_never_crash_a_session(payload: bytes) -> None:
    with gm.GuestMemory.from_layout(LAYOUT, tags="software") as memory:
        session = Session(memory, dict, 7)
        before = snapshot(memory)
        reply = session.handle(payload)
        assert reply is None or isinstance(reply, bytes)
        if payload[:1] not in (b"M", b"X", b"Q"):
            assert_unchanged(memory, before)


def test_the_stub_listens_on_loopback_unless_told_otherwise(mem: gm.GuestMemory) -> None:
    with GdbStub(mem) as server:
        assert server.address.startswith("127.0.0.1:")


def test_a_register_provider_that_raises_gets_an_error_reply(mem: gm.GuestMemory) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("vCPU state unavailable")

    with GdbStub(mem, registers=broken) as server:
        thread = threading.Thread(target=server.serve, args=(1,), daemon=True)
        thread.start()
        c = Client(server.address)
        assert c.ask(b"g") == b"E01"
        assert c.ask(b"m%x,1" % BASE) == b"00"  # the session goes on
        c.raw(frame(b"k"))
        c.close()
        thread.join(timeout=30)


def serving(server: GdbStub, sessions: int | None = None) -> threading.Thread:
    thread = threading.Thread(target=server.serve, args=(sessions,), daemon=True)
    thread.start()
    return thread


def test_a_second_client_is_refused_at_once_and_the_first_goes_on(stub: GdbStub) -> None:
    first = Client(stub.address)
    assert first.ask(b"m%x,1" % BASE) == b"00"
    second = Client(stub.address)
    assert second.ask(b"qSupported:multiprocess+") == BUSY_REPLY
    assert second.sock.recv(100) == b""  # then disconnected
    second.close()
    assert first.ask(b"m%x,2" % BASE) == b"0001"
    first.raw(frame(b"D"))
    first.close()
    third = Client(stub.address)  # served once the first has gone
    assert third.ask(b"m%x,1" % BASE) == b"00"
    third.close()


def test_a_refused_client_starting_with_another_packet_gets_no_reply(stub: GdbStub) -> None:
    first = Client(stub.address)
    assert first.ask(b"qAttached") == b"1"
    lldb_like = Client(stub.address)
    lldb_like.raw(b"+" + frame(b"QStartNoAckMode"))  # LLDB's first packet
    assert lldb_like.sock.recv(100) == b""  # closed without a reply: LLDB stops cleanly
    assert first.ask(b"qAttached") == b"1"
    lldb_like.close()
    first.close()


def test_a_refused_client_that_sends_nothing_is_dropped(mem: gm.GuestMemory) -> None:
    with GdbStub(mem) as server:
        serving(server)
        first = Client(server.address)
        assert first.ask(b"qAttached") == b"1"
        silent = Client(server.address)
        silent.sock.settimeout(REFUSAL_WAIT + 10)
        assert silent.sock.recv(100) == b""
        assert first.ask(b"qAttached") == b"1"
        silent.close()
        first.close()


def test_refused_clients_waiting_at_once_are_bounded(mem: gm.GuestMemory) -> None:
    with GdbStub(mem) as server:
        serving(server)
        first = Client(server.address)
        assert first.ask(b"qAttached") == b"1"
        waiting = []
        for _ in range(MAX_REFUSING):
            waiting.append(Client(server.address))
            assert first.ask(b"qAttached") == b"1"  # each is admitted before the next comes
        extra = Client(server.address)
        extra.sock.settimeout(REFUSAL_WAIT / 2)
        assert extra.sock.recv(100) == b""  # closed at once, not after REFUSAL_WAIT
        assert waiting[0].ask(b"qSupported") == BUSY_REPLY  # the others still get their reason
        for c in [*waiting, extra, first]:
            c.close()


@pytest.mark.parametrize("leftover", [b"", b"$m4000"], ids=["silent", "half-a-packet"])
def test_an_idle_session_ends_and_the_next_client_is_served(
    mem: gm.GuestMemory, leftover: bytes
) -> None:
    with GdbStub(mem, idle_timeout=0.5) as server:
        serving(server)
        idle = Client(server.address)
        assert idle.ask(b"qAttached") == b"1"
        idle.raw(leftover)
        started = time.monotonic()
        assert idle.sock.recv(100) == b""
        assert 0.4 < time.monotonic() - started < 10
        idle.close()
        after = Client(server.address)
        assert after.ask(b"qAttached") == b"1"
        after.close()


def test_close_ends_the_active_session_and_serve_returns(mem: gm.GuestMemory) -> None:
    server = GdbStub(mem, idle_timeout=None)
    thread = serving(server)
    c = Client(server.address)
    assert c.ask(b"qAttached") == b"1"
    c.raw(b"$m40")  # in the middle of a packet
    server.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert c.sock.recv(100) == b""
    c.close()


def test_close_before_serve_makes_serve_return_at_once(mem: gm.GuestMemory) -> None:
    server = GdbStub(mem)
    server.close()
    thread = serving(server)
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize("host", ["0.0.0.0", ""])
def test_binding_a_non_loopback_address_needs_allow_remote(mem: gm.GuestMemory, host: str) -> None:
    with pytest.raises(RemoteAddressError, match="no authentication"):
        GdbStub(mem, host=host)
    with GdbStub(mem, host=host, allow_remote=True) as server:
        assert server.address.split(":")[0] in ("0.0.0.0", "[::]")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("", False),
        ("192.0.2.1", False),
        ("no.such.host.invalid", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_read_only_stub_refuses_writes(mem: gm.GuestMemory) -> None:
    before = snapshot(mem)
    with GdbStub(mem, read_only=True) as server:
        serving(server)
        c = Client(server.address)
        assert c.ask(b"M%x,1:ff" % BASE) == b"E0d"
        assert c.ask(b"m%x,1" % BASE) == mem.read(BASE, 1).hex().encode()
        c.close()
    assert_unchanged(mem, before)
