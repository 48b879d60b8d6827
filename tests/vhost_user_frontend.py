"""A synthetic vhost-user frontend for the backend's tests: what QEMU does, in Python.

Guest RAM is one memfd shared as two regions at different offsets, as QEMU's
x86 machines do (below 640 KiB, and from 1 MiB); the 384 KiB between them
is in the memfd but not in the table, a canary nothing may write. Rings are
laid out with the tests' virtio driver in the frontend's own mapping.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import guestmem as gm
from guestmem.devices.virtio_blk import VirtioBlock
from guestmem.region import SharedRegion
from guestmem.vhost_user import serve_connection
from guestmem.vhost_user.protocol import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    LOG,
    MEMORY_HEADER,
    REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_STATE,
    ProtocolFeature,
    Request,
)
from virtq_driver import Driver, ring_sizes

MEMFD_SIZE = 2 << 20
LOW = (0x0, 0xA0000, 0x0)  # (gpa, size, offset in the memfd)
HIGH = (0x100000, 0x100000, 0x100000)
GAP = (0xA0000, 0x60000)  # (offset, size): in the memfd, outside the table
USER_BASE = 0x7F00_0000_0000  # the frontend's "user address" of the memfd's byte 0
RING_GPA = 0x100000
QUEUE_SIZE = 16
SECTOR = 512
VERSION_1 = 1 << 32


def region_entries() -> list[tuple[int, int, int, int]]:
    """(gpa, size, user address, mmap offset) of the two regions."""
    return [(g, s, USER_BASE + o, o) for g, s, o in (LOW, HIGH)]


def memory_table_payload(entries: Sequence[tuple[int, int, int, int]]) -> bytes:
    """SET_MEM_TABLE's payload for ``entries``."""
    out = MEMORY_HEADER.pack(len(entries), 0)
    return out + b"".join(REGION.pack(*e) for e in entries)


def user(gpa: int) -> int:
    """The frontend's user address of ``gpa``."""
    for g, s, o in (LOW, HIGH):
        if g <= gpa < g + s:
            return USER_BASE + o + gpa - g
    raise ValueError(hex(gpa))


@dataclass
class BackendThread:
    """``serve_connection`` on the far end of a socketpair, in a thread."""

    sock: socket.socket
    thread: threading.Thread
    errors: list[gm.GuestMemoryError] = field(default_factory=list)
    devices: list[VirtioBlock] = field(default_factory=list)

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the backend did not end its connection"


def start_backend(
    disk: str, tags: gm.TagMode = gm.TagMode.NONE, read_only: bool = False
) -> tuple[socket.socket, BackendThread]:
    """A connected frontend socket and the backend serving its other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    errors: list[gm.GuestMemoryError] = []
    devices: list[VirtioBlock] = []

    def make() -> VirtioBlock:
        device = VirtioBlock(None, disk, read_only=read_only, locked=False)
        devices.append(device)
        return device

    thread = threading.Thread(
        target=serve_connection,
        args=(theirs, make, tags),
        kwargs={"on_error": errors.append, "timeout": 2.0},
        daemon=True,
    )
    thread.start()
    return ours, BackendThread(theirs, thread, errors, devices)


class Frontend:
    """The frontend's side of one connection, with guest RAM shared from a memfd."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = os.memfd_create("frontend-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, MEMFD_SIZE)
        self.raw = mmap.mmap(self.fd, MEMFD_SIZE)
        shared = [SharedRegion(g, s, self.fd, offset=o) for g, s, o in (LOW, HIGH)]
        self.mem = gm.GuestMemory.attach(shared, tags="none")
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.driver = Driver(self.mem, QUEUE_SIZE, RING_GPA)
        self.log_fd: int | None = None
        self.log: mmap.mmap | None = None

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        self.raw.close()
        for fd in (self.fd, self.kick, self.call):
            os.close(fd)
        if self.log is not None:
            self.log.close()
        if self.log_fd is not None:
            os.close(self.log_fd)

    # ---- messages ----------------------------------------------------------------

    def send(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, flags: int = VERSION
    ) -> None:
        data = HEADER.pack(request, flags, len(payload)) + payload
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([data], ancillary)

    def reply(self, request: int) -> bytes:
        header = self._exactly(HEADER.size)
        code, flags, size = HEADER.unpack(header)
        assert code == request, f"a reply to {code}, not {request}"
        assert flags == VERSION | FLAG_REPLY
        return self._exactly(size)

    def _exactly(self, n: int) -> bytes:
        out = b""
        self.sock.settimeout(5)
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the backend closed the connection"
            out += chunk
        return out

    def ask(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        self.send(request, payload, fds)
        return self.reply(request)

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY; the backend's u64 status."""
        self.send(request, payload, fds, flags=VERSION | FLAG_NEED_REPLY)
        return int(U64.unpack(self.reply(request))[0])

    def closed_by_backend(self) -> bool:
        """Whether the backend closed the connection within 5 s.

        EOF, or a reset: closing with part of a message unread resets a Unix socket.
        """
        self.sock.settimeout(5)
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    # ---- what QEMU's vhost-user-blk does -------------------------------------------

    def negotiate(self, protocol: int | None = None) -> int:
        """GET_FEATURES, the protocol features, SET_OWNER; the features offered."""
        features = int(U64.unpack(self.ask(Request.GET_FEATURES))[0])
        offered = int(U64.unpack(self.ask(Request.GET_PROTOCOL_FEATURES))[0])
        chosen = offered if protocol is None else protocol
        self.send(Request.SET_PROTOCOL_FEATURES, U64.pack(chosen))
        self.send(Request.SET_OWNER)
        return features

    def set_features(self, features: int) -> None:
        self.send(Request.SET_FEATURES, U64.pack(features))

    def set_mem_table(self) -> None:
        fds = [self.fd, self.fd]
        assert self.ack(Request.SET_MEM_TABLE, memory_table_payload(region_entries()), fds) == 0

    def add_region(self, entry: tuple[int, int, int, int]) -> int:
        """ADD_MEM_REG of ``entry`` from the memfd; the backend's status."""
        return self.ack(Request.ADD_MEM_REG, bytes(8) + REGION.pack(*entry), [self.fd])

    def remove_region(self, entry: tuple[int, int, int, int]) -> int:
        """REM_MEM_REG of ``entry``; the backend's status."""
        return self.ack(Request.REM_MEM_REG, bytes(8) + REGION.pack(*entry))

    def start_ring(self, *, flags: int = 0, base: int = 0) -> None:
        desc, avail, used = self.driver.rings()
        self.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, QUEUE_SIZE))
        self.send(Request.SET_VRING_BASE, VRING_STATE.pack(0, base))
        addr = VRING_ADDR.pack(0, flags, user(desc), user(used), user(avail), used)
        self.send(Request.SET_VRING_ADDR, addr)
        self.send(Request.SET_VRING_KICK, U64.pack(0), [self.kick])
        self.send(Request.SET_VRING_CALL, U64.pack(0), [self.call])
        assert self.ack(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1)) == 0

    def start(self, *, log: bool = False) -> int:
        """Everything up to a running ring; the features acked."""
        offered = self.negotiate()
        acked = offered & ~F_LOG_ALL
        self.set_features(acked)
        self.set_mem_table()
        self.start_ring()
        return acked

    def set_log(self, size: int) -> None:
        self.log_fd = os.memfd_create("frontend-log", os.MFD_CLOEXEC)
        os.ftruncate(self.log_fd, size)
        self.log = mmap.mmap(self.log_fd, size)
        reply = self.ask(Request.SET_LOG_BASE, LOG.pack(size, 0), [self.log_fd])
        assert U64.unpack(reply)[0] == 0

    def dirty_pages(self) -> set[int]:
        """The 4 KiB page numbers set in the log."""
        assert self.log is not None
        bits = self.log[:]
        return {i * 8 + b for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1}

    def get_vring_base(self) -> int:
        index, num = VRING_STATE.unpack(self.ask(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0)))
        assert index == 0
        return int(num)

    # ---- virtio-blk requests --------------------------------------------------------

    def request(
        self, kind: int, sector: int, data_gpa: int, length: int, *, header_gpa: int = 0x180000
    ) -> int:
        """One request (header, data, status), kicked; waits for the call; returns the status."""
        status_gpa = header_gpa + 0x100
        self.mem.write(header_gpa, struct.pack("<IIQ", kind, 0, sector))
        self.mem.fill(status_gpa, 1, 0xFF)
        buffers = [(header_gpa, 16, False)]
        if length:
            buffers.append((data_gpa, length, kind in (0, 8)))  # IN, GET_ID: device-writable
        buffers.append((status_gpa, 1, True))
        before = self.driver.used_idx()
        self.driver.set_used_event(before)  # EVENT_IDX: a call for this request
        self.driver.add(buffers)
        os.eventfd_write(self.kick, 1)
        self.wait_call()
        assert self.driver.used_idx() == (before + 1) & 0xFFFF
        return self.mem.read(status_gpa, 1)[0]

    def wait_call(self) -> None:
        import select

        ready, _, _ = select.select([self.call], [], [], 5)
        assert ready, "the backend did not signal the call eventfd"
        os.eventfd_read(self.call)

    def gap_is_untouched(self) -> bool:
        offset, size = GAP
        return self.raw[offset : offset + size] == bytes(size)


def open_fds() -> set[int]:
    """This process's open fds."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def blk_features(offered: int) -> int:
    """What a virtio-blk driver acks: everything offered but the log."""
    return offered & ~F_LOG_ALL


ALL_PROTOCOL = int(
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
)
__all__ = [
    "ALL_PROTOCOL",
    "F_LOG_ALL",
    "F_PROTOCOL_FEATURES",
    "GAP",
    "QUEUE_SIZE",
    "RING_GPA",
    "SECTOR",
    "VERSION_1",
    "BackendThread",
    "Callable",
    "Frontend",
    "blk_features",
    "open_fds",
    "ring_sizes",
    "start_backend",
]
