"""virtio-blk (virtio 1.x, section 5.2): a disk image file served to the guest.

Each request is one descriptor chain: a 16-byte header the driver wrote
(type, reserved, sector), the data buffers, and a status byte the device
writes last. Data moves between the image and guest RAM with
``mem.dma.io.preadv_from``/``pwritev_to`` (one system call per request,
through the syscall-safe DMA route: zero-copy and still tag-checked under
MATCH_ALL), so a guest page the guest has tagged is read and written
without faulting and without changing a tag. Supported: IN, OUT, FLUSH,
GET_ID; anything else is answered UNSUPP. A request the device cannot make
sense of (a header that is not 16 readable bytes, no status byte) is
answered IOERR when there is somewhere to say it, and the chain is
returned either way.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import guestmem as gm
from guestmem.devices.disk_lock import DiskLock
from guestmem.devices.interrupt import UsedBuffers
from guestmem.dma_io import DmaIO
from guestmem.saved_state import Reader, Writer
from guestmem.virtio import DescriptorChain, SplitQueue

DEVICE_ID = 2
SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 2, 1 << 5, 1 << 6, 1 << 9
SEG_MAX = 126
ID_BYTES = 20
STATE_VERSION = 1
_HEADER = struct.Struct("<IIQ")
Transfer = Callable[[int, list[tuple[int, int]], int], int]


@dataclass(frozen=True)
class BlockState:
    """What a virtio-blk carries beyond its disk's shape: the count of requests served."""

    requests: int


class VirtioBlock:
    """A virtio-blk device over the image at ``path`` (read-only with ``read_only``)."""

    device_id = DEVICE_ID
    queue_count = 1
    _memory: gm.GuestMemory
    _io: DmaIO

    def __init__(
        self,
        memory: gm.GuestMemory | None,
        path: str,
        *,
        read_only: bool = False,
        locked: bool = True,
    ) -> None:
        """Open the image; its size, rounded down to sectors, is the disk's capacity.

        ``memory`` may come later (:meth:`use_memory`), before the device is
        activated: a vhost-user frontend gives it after asking for the config.

        With ``locked`` the image is locked (:mod:`disk_lock`: exclusive, or
        shared when ``read_only``), and DiskLockedError names it if another
        VMM holds it; a migration target passes False and calls :meth:`lock`
        before it runs.
        """
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            self._setup(memory, fd, read_only, os.path.basename(path).encode())
            self.image_lock = DiskLock(fd, path, shared=read_only)
            if locked:
                self.image_lock.acquire()
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def over_fd(
        cls,
        memory: gm.GuestMemory | None,
        fd: int,
        *,
        read_only: bool = False,
        serial: bytes = b"",
    ) -> VirtioBlock:
        """A device over an open image file (it becomes the device's to close)."""
        device = cls.__new__(cls)
        device._setup(memory, fd, read_only, serial)
        device.image_lock = DiskLock(fd, f"on fd {fd}", shared=read_only)
        return device

    def _setup(
        self, memory: gm.GuestMemory | None, fd: int, read_only: bool, serial: bytes
    ) -> None:
        if memory is not None:
            self.use_memory(memory)
        self.read_only = read_only
        self.fd = fd
        self.size = os.fstat(fd).st_size // SECTOR * SECTOR
        self.features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | (F_RO if read_only else 0)
        self.serial = serial[:ID_BYTES]
        self._queue: SplitQueue | None = None
        self.requests = 0

    def use_memory(self, memory: gm.GuestMemory) -> None:
        """Serve requests in ``memory`` from now on (set while the device is not active)."""
        self._memory = memory
        self._io = memory.dma.io

    def config(self) -> bytes:
        """Capacity (sectors), size_max, seg_max, geometry, blk_size."""
        return struct.pack("<QIIHBBI", self.size // SECTOR, 0, SEG_MAX, 0, 0, 0, SECTOR)

    def write_config(self, offset: int, data: bytes) -> None:
        """Ignored: no field is writable without CONFIG_WCE, which is not offered."""

    def activate(self, queues: Sequence[SplitQueue], features: int, used: UsedBuffers) -> None:
        """Serve the request queue (requests are used within their kick: ``used`` is not needed)."""
        self._queue = queues[0]

    def reset(self) -> None:
        """Forget the queue (requests are served synchronously: none is in flight)."""
        self._queue = None

    def notify(self, queue: int) -> bool:
        """Serve every request made available; True when the driver wants an interrupt."""
        ring = self._queue
        if ring is None:
            return False
        interrupt = False
        while (chain := ring.pop()) is not None:
            written = self._serve(chain)
            interrupt |= ring.push(chain.head, written)
            self.requests += 1
        return interrupt

    def save_state(self) -> bytes:
        """Capacity (sectors) and read-only, which the target's disk must match, and the count."""
        out = Writer().u8(STATE_VERSION).u64(self.size // SECTOR).u8(self.read_only)
        return out.u64(self.requests).bytes()

    def decode_state(self, reader: Reader) -> BlockState:
        """Read the saved device's state; StateError if this disk is not the same shape.

        The image is this device's own (the target is started with the same
        disks, as with QEMU), so only its shape is compared.
        """
        reader.version("virtio-blk", STATE_VERSION)
        reader.expect("the capacity in sectors", reader.u64("the capacity"), self.size // SECTOR)
        reader.expect("read-only", reader.flag("read-only"), self.read_only)
        requests = reader.u64("the request count")
        reader.end()
        return BlockState(requests)

    def apply_state(self, state: BlockState) -> None:
        """Continue the saved device's count."""
        self.requests = state.requests

    def load_state(self, data: bytes) -> None:
        """Decode ``data`` and apply it: a StateError, and nothing changed, if it is bad."""
        self.apply_state(self.decode_state(Reader(data)))

    @property
    def locked(self) -> bool:
        """Whether this device holds its image's lock."""
        return self.image_lock.held

    def lock(self) -> None:
        """Lock the image (a migration target, before it runs); DiskLockedError if held."""
        self.image_lock.acquire()

    def unlock(self) -> None:
        """Release the image's lock (a migration source, at the go-ahead); idempotent."""
        self.image_lock.release()

    def close(self) -> None:
        """Close the image, which releases its lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.image_lock.forget()

    def _serve(self, chain: DescriptorChain) -> int:
        """Carry out one request; the bytes written into the chain, status included."""
        writable = chain.writable
        if not writable or chain.writable_len < 1:
            return 0  # nowhere to put a status: the request is dropped, the chain returned
        last_gpa, last_len = writable[-1]
        if last_len == 1:  # the usual shape: the status byte in a descriptor of its own
            status_gpa, data_in = last_gpa, list(writable[:-1])
        else:
            status_gpa, data_in = _last_byte(writable), _without_last_byte(writable)
        header = self._header(chain.readable)
        written = 0
        if header is None:
            status = S_IOERR
        else:
            kind, sector = header
            data_out = _skip(chain.readable, _HEADER.size)
            status, written = self._request(kind, sector, data_out, data_in)
        self._memory.fill(status_gpa, 1, status, access=gm.Access.DMA)
        return written + 1

    def _header(self, readable: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        if readable and readable[0][1] >= _HEADER.size:  # the usual shape: one descriptor
            raw = self._memory.read(readable[0][0], _HEADER.size, access=gm.Access.DMA)
        elif sum(n for _, n in readable) < _HEADER.size:
            return None
        else:
            raw = self._memory.readv(_take(readable, _HEADER.size), access=gm.Access.DMA)
        kind, _reserved, sector = _HEADER.unpack(raw)
        return kind, sector

    def _request(
        self,
        kind: int,
        sector: int,
        data_out: list[tuple[int, int]],
        data_in: list[tuple[int, int]],
    ) -> tuple[int, int]:
        """(status, bytes written into the guest) for one request."""
        io = self._io
        try:
            if kind == T_IN:
                length = sum(n for _, n in data_in)
                if not self._fits(sector, length):
                    return S_IOERR, 0
                return S_OK, _whole(io.preadv_from, self.fd, data_in, sector * SECTOR)
            if kind == T_OUT:
                length = sum(n for _, n in data_out)
                if self.read_only or not self._fits(sector, length):
                    return S_IOERR, 0
                _whole(io.pwritev_to, self.fd, data_out, sector * SECTOR)
                return S_OK, 0
            if kind == T_FLUSH:
                if not self.read_only:
                    os.fdatasync(self.fd)
                return S_OK, 0
            if kind == T_GET_ID:
                serial = self.serial.ljust(ID_BYTES, b"\0")[: sum(n for _, n in data_in)]
                self._memory.writev(_take(data_in, len(serial)), serial, access=gm.Access.DMA)
                return S_OK, len(serial)
        except OSError:
            return S_IOERR, 0
        return S_UNSUPP, 0

    def _fits(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector * SECTOR + length <= self.size


def _whole(call: Transfer, fd: int, ranges: list[tuple[int, int]], offset: int) -> int:
    """Repeat a positioned transfer until every byte moved (short counts continue)."""
    total = sum(n for _, n in ranges)
    done = 0
    while done < total:
        moved = int(call(fd, _skip(ranges, done), offset + done))
        if moved <= 0:
            raise OSError(f"the image ended {total - done} bytes early")
        done += moved
    return done


def _take(ranges: Sequence[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    out = []
    for gpa, n in ranges:
        if count <= 0:
            break
        out.append((gpa, min(n, count)))
        count -= n
    return out


def _skip(ranges: Sequence[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    out = []
    for gpa, n in ranges:
        if count >= n:
            count -= n
            continue
        out.append((gpa + count, n - count))
        count = 0
    return out


def _last_byte(ranges: Sequence[tuple[int, int]]) -> int:
    nonempty = [(gpa, n) for gpa, n in ranges if n]
    gpa, n = nonempty[-1]
    return gpa + n - 1


def _without_last_byte(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    total = sum(n for _, n in ranges)
    return _take(ranges, total - 1)
