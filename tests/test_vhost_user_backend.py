"""The vhost-user backend driven by a synthetic frontend: negotiation, I/O, logging, reconnects.

The frontend (tests/vhost_user_frontend.py) does what QEMU's vhost-user-blk
does, in order, over a socketpair or the server's socket; the backend serves
guestmem's own virtio-blk. A test against code this project wrote proves
only that the two agree: the real counterpart is QEMU (the lead's harness).
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

import guestmem as gm
from guestmem.devices.virtio_blk import F_FLUSH, F_RO, VirtioBlock
from guestmem.vhost_user import OFFERED_PROTOCOL_FEATURES, BackendServer, LogError, VringError
from guestmem.vhost_user.protocol import CONFIG_HEADER, LOG, U64, VRING_STATE, Request
from vhost_user_frontend import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    SECTOR,
    VERSION_1,
    Frontend,
    open_fds,
    region_entries,
    start_backend,
)

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
DISK_SECTORS = 256


@pytest.fixture
def disk(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (DISK_SECTORS * SECTOR // 256))
    return str(path)


def _a_read_is_served(path: str) -> None:
    """A new frontend on the server's socket sets up and has one read served."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    front = Frontend(sock)
    try:
        front.start()
        assert front.request(T_IN, 0, 0x30000, SECTOR) == 0
    finally:
        front.close()


def test_negotiation_offers_what_vhost_user_blk_needs(disk: str) -> None:
    sock, backend = start_backend(disk)
    front = Frontend(sock)
    try:
        features = int(U64.unpack(front.ask(Request.GET_FEATURES))[0])
        assert features & F_PROTOCOL_FEATURES
        assert features & F_LOG_ALL
        assert features & VERSION_1
        assert features & F_FLUSH
        assert not features & F_RO
        protocol = int(U64.unpack(front.ask(Request.GET_PROTOCOL_FEATURES))[0])
        assert protocol == int(OFFERED_PROTOCOL_FEATURES)
        front.send(Request.SET_PROTOCOL_FEATURES, U64.pack(protocol))
        assert front.ack(Request.SET_OWNER) == 0
        assert U64.unpack(front.ask(Request.GET_QUEUE_NUM))[0] == 1
        # QEMU asks for the whole virtio_blk_config (60 bytes); unknown fields are zero.
        reply = front.ask(Request.GET_CONFIG, CONFIG_HEADER.pack(0, 60, 0) + bytes(60))
        assert CONFIG_HEADER.unpack_from(reply) == (0, 60, 0)
        config = reply[CONFIG_HEADER.size :]
        assert len(config) == 60
        assert struct.unpack_from("<Q", config)[0] == DISK_SECTORS
        assert struct.unpack_from("<I", config, 20)[0] == SECTOR  # blk_size
        assert config[24:] == bytes(36)
    finally:
        front.close()
        backend.join()
    assert backend.errors == []


def test_read_write_flush_through_two_regions_of_one_memfd(disk: str) -> None:
    sock, backend = start_backend(disk)
    front = Frontend(sock)
    try:
        front.start()
        payload = bytes((i * 7) & 0xFF for i in range(2 * SECTOR))
        front.mem.write(0x20000, payload)  # in the low region (offset 0)
        assert front.request(T_OUT, 4, 0x20000, len(payload)) == 0
        assert front.request(T_FLUSH, 0, 0, 0) == 0
        assert front.request(T_IN, 4, 0x140000, len(payload)) == 0  # high region (offset 1 MiB)
        assert front.mem.read(0x140000, len(payload)) == payload
        assert front.request(T_IN, 0, 0x30000, SECTOR) == 0
        assert front.mem.read(0x30000, SECTOR) == bytes(range(256)) * 2
        assert front.request(T_GET_ID, 0, 0x31000, 20) == 0
        assert front.mem.read(0x31000, 20).rstrip(b"\0") == b"disk.img"
        assert front.request(T_IN, DISK_SECTORS, 0x30000, SECTOR) == 1  # past the end: IOERR
        assert front.get_vring_base() == 6
        assert front.gap_is_untouched()
    finally:
        front.close()
        backend.join()
    assert backend.errors == []
    with open(disk, "rb") as f:
        f.seek(4 * SECTOR)
        assert f.read(len(payload)) == payload


def test_a_stopped_ring_restarts_from_its_base(disk: str) -> None:
    sock, backend = start_backend(disk)
    front = Frontend(sock)
    try:
        front.start()
        assert front.request(T_IN, 0, 0x30000, SECTOR) == 0
        base = front.get_vring_base()
        assert base == 1
        front.start_ring(base=base)
        assert front.request(T_IN, 1, 0x30000, SECTOR) == 0
        assert front.get_vring_base() == 2
    finally:
        front.close()
        backend.join()
    assert backend.errors == []


def test_read_only_disk_refuses_writes(disk: str) -> None:
    sock, backend = start_backend(disk, read_only=True)
    front = Frontend(sock)
    try:
        offered = front.negotiate()
        assert offered & F_RO
        front.set_features(offered & ~F_LOG_ALL)
        front.set_mem_table()
        front.start_ring()
        front.mem.write(0x20000, b"x" * SECTOR)
        assert front.request(T_OUT, 0, 0x20000, SECTOR) == 1
    finally:
        front.close()
        backend.join()
    with open(disk, "rb") as f:
        assert f.read(SECTOR) == bytes(range(256)) * 2


def test_dirty_log_marks_every_page_written_and_none_only_read(disk: str) -> None:
    sock, backend = start_backend(disk)
    front = Frontend(sock)
    try:
        acked = front.start()
        front.set_log(64)  # 512 pages of 4 KiB: GPA 0 to 2 MiB
        front.mem.write(0x20000, b"w" * 2 * SECTOR)
        assert front.request(T_OUT, 0, 0x20000, 2 * SECTOR) == 0
        assert front.dirty_pages() == set(), "nothing is logged before VHOST_F_LOG_ALL"
        assert front.ack(Request.SET_FEATURES, U64.pack(acked | F_LOG_ALL)) == 0
        # A write request only reads its data page (0x20): the status byte's page
        # (0x180, with the header) and the used ring's (0x100) are written.
        assert front.request(T_OUT, 0, 0x20000, 2 * SECTOR) == 0
        assert front.dirty_pages() == {0x100, 0x180}
        front.log[:] = bytes(64)  # type: ignore[index]  # the frontend's sync clears it
        # A read request writes its data: 3 pages from 0x140800 (0x140, 0x141, 0x142).
        assert front.request(T_IN, 0, 0x140800, 16 * SECTOR) == 0
        assert front.dirty_pages() == {0x100, 0x140, 0x141, 0x142, 0x180}
        front.log[:] = bytes(64)  # type: ignore[index]
        assert front.ack(Request.SET_FEATURES, U64.pack(acked)) == 0
        assert front.request(T_IN, 0, 0x30000, SECTOR) == 0
        assert front.dirty_pages() == set(), "logging stops with VHOST_F_LOG_ALL"
    finally:
        front.close()
        backend.join()
    assert backend.errors == []


def test_a_log_too_small_for_the_table_is_refused(disk: str) -> None:
    sock, backend = start_backend(disk)
    front = Frontend(sock)
    try:
        front.start()
        front.log_fd = os.memfd_create("small-log", os.MFD_CLOEXEC)
        os.ftruncate(front.log_fd, 4096)
        front.send(Request.SET_LOG_BASE, LOG.pack(32, 0), [front.log_fd])
        assert front.closed_by_backend()
    finally:
        front.close()
        backend.join()
    assert [type(e) for e in backend.errors] == [LogError]


def test_software_tags_are_refused(disk: str) -> None:
    sock, backend = start_backend(disk, tags=gm.TagMode.SOFTWARE)
    front = Frontend(sock)
    try:
        assert front.closed_by_backend()
    finally:
        front.close()
        backend.join()
    assert len(backend.errors) == 1
    assert isinstance(backend.errors[0], gm.UsageError)
    assert "SOFTWARE" in str(backend.errors[0])


def test_the_server_serves_the_next_frontend_a_fresh_device(disk: str, tmp_path: Path) -> None:
    made: list[VirtioBlock] = []

    def make() -> VirtioBlock:
        device = VirtioBlock(None, disk, locked=False)
        made.append(device)
        return device

    errors: list[gm.GuestMemoryError] = []
    path = str(tmp_path / "vu.sock")
    server = BackendServer(path, make, gm.TagMode.NONE, on_error=errors.append)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert os.stat(path).st_mode & 0o777 == 0o600
    try:
        for round_ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            front = Frontend(sock)
            try:
                front.start()
                front.mem.write(0x20000, bytes([round_]) * SECTOR)
                assert front.request(T_OUT, round_, 0x20000, SECTOR) == 0
                assert front.request(T_IN, round_, 0x30000, SECTOR) == 0
                assert front.mem.read(0x30000, SECTOR) == bytes([round_]) * SECTOR
                assert made[-1].requests == 2, "each frontend gets a fresh device"
            finally:
                front.close()
        # A hostile frontend in between does not stop the next one.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        hostile = Frontend(sock)
        hostile.send(Request.SET_VRING_NUM, VRING_STATE.pack(5, 16))
        assert hostile.closed_by_backend()
        hostile.close()
        _a_read_is_served(path)
    finally:
        server.close()
        thread.join(10)
    assert not thread.is_alive()
    assert len(made) == 5
    assert [type(e) for e in errors] == [VringError]
    assert not os.path.exists(path)


def test_a_session_leaves_no_fd_open(disk: str) -> None:
    gc.collect()  # what earlier tests left for the collector goes first
    before = open_fds()
    sock, backend = start_backend(disk)
    front = Frontend(sock)
    try:
        acked = front.start()
        front.set_log(64)
        front.set_features(acked | F_LOG_ALL)
        front.send(Request.SET_LOG_FD, b"", [front.call])
        front.send(Request.SET_VRING_ERR, U64.pack(0), [front.call])
        assert front.request(T_IN, 0, 0x30000, SECTOR) == 0
        front.set_mem_table()  # a second table replaces the first while the ring runs
        assert front.request(T_IN, 1, 0x30000, SECTOR) == 0
    finally:
        front.close()
        backend.join()
    assert backend.errors == []
    gc.collect()  # a mapping's dup of the memfd goes with its last view
    assert open_fds() == before


def test_regions_added_and_removed_one_at_a_time(disk: str) -> None:
    sock, backend = start_backend(disk)
    front = Frontend(sock)
    low, high = region_entries()
    try:
        offered = front.negotiate()
        assert U64.unpack(front.ask(Request.GET_MAX_MEM_SLOTS))[0] == 32
        front.set_features(offered & ~F_LOG_ALL)
        assert front.add_region(high) == 0
        assert front.add_region(low) == 0
        front.start_ring()
        front.mem.write(0x20000, b"L" * SECTOR)  # low
        assert front.request(T_OUT, 1, 0x20000, SECTOR) == 0
        assert front.remove_region(low) == 0  # the ring lives in the high region
        assert front.request(T_IN, 1, 0x140000, SECTOR) == 0
        assert front.mem.read(0x140000, SECTOR) == b"L" * SECTOR
        assert front.add_region(low) == 0
        assert front.request(T_IN, 1, 0x21000, SECTOR) == 0
        assert front.mem.read(0x21000, SECTOR) == b"L" * SECTOR
        assert front.get_vring_base() == 3
        assert front.gap_is_untouched()
    finally:
        front.close()
        backend.join()
    assert backend.errors == []


def test_the_server_survives_a_device_that_fails_to_start(disk: str, tmp_path: Path) -> None:
    calls: list[int] = []

    def make() -> VirtioBlock:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no device this time")
        return VirtioBlock(None, disk, locked=False)

    errors: list[gm.GuestMemoryError] = []
    path = str(tmp_path / "vu.sock")
    server = BackendServer(path, make, gm.TagMode.NONE, on_error=errors.append)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.connect(path)
        first.settimeout(5)
        assert first.recv(1) == b"", "the failed connection is closed"
        first.close()
        _a_read_is_served(path)
    finally:
        server.close()
        thread.join(10)
    assert len(errors) == 1
    assert "no device this time" in str(errors[0])
