"""Request rate of the reference VMM's virtio-blk device model over ``guestmem.virtio``.

A synthetic driver posts 4 KiB read requests (a 16-byte readable header, a
4 KiB writable data buffer, a 1-byte writable status) on one split queue at
a given queue depth; the device (``guestmem.devices.virtio_blk.VirtioBlock``, the
one the VMM serves guests with) pops each chain, reads the header, fills the
data buffer from a file in the page cache with one ``preadv`` (``mem.dma.io``,
the I/O policy's route), writes the status and pushes the used element. The
device's time is measured apart from the driver's; the cost split comes from
a second run of the same steps with a clock around each part: ring (pop and
push), copy (header and status), system call.
"""

from __future__ import annotations

import os
import statistics
import struct
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import guestmem as gm
from guestmem.devices.virtio_blk import VirtioBlock
from guestmem.tools.bench.host import where_it_ran
from guestmem.virtio import DescriptorChain, SplitQueue

BLOCK = 4096
SECTOR = 512
QUEUE_SIZE = 256
FILE_SIZE = 16 << 20
GPA = 0x4000_0000
MEMORY = 8 << 20
HEADER = struct.Struct("<IIQ")  # type, reserved, sector
VIRTIO_BLK_T_IN = 0
NEXT, WRITE = 1, 2
DESCRIPTOR = struct.Struct("<QIHH")
VIRTIO_BLK_S_OK = 0


@dataclass(frozen=True)
class Figure:
    """One queue depth's figures: rates in requests/s, costs in ns per request."""

    depth: int
    requests: int
    device_rate: float  # device loop only
    end_to_end_rate: float  # the driver's posting and reaping included
    ring_ns: float  # pop + push (the empty pop that ends a batch included)
    copy_ns: float  # header read + status write
    syscall_ns: float  # the preadv into guest memory
    other_ns: float  # the rest of the device loop (Python glue, the clock itself)
    floor_ns: float  # os.preadv of 4 KiB into a bytearray: the system call alone


class _Driver:
    """Rings at GPA, one fixed 3-descriptor chain per slot of the queue depth."""

    def __init__(self, mem: gm.GuestMemory, depth: int) -> None:
        self.mem = mem
        self.depth = depth
        self.desc, self.avail = GPA, GPA + 16 * QUEUE_SIZE
        self.used = (self.avail + 6 + 2 * QUEUE_SIZE + 3) & ~3
        self.headers = GPA + 0x10000
        self.status = GPA + 0x20000
        self.data = GPA + 0x100000
        self.avail_idx = 0
        self.used_seen = 0
        self.next_sector = 0
        mem.fill(GPA, 0x10000, 0)
        table = bytearray()
        for k in range(depth):
            table += DESCRIPTOR.pack(self.headers + 16 * k, 16, NEXT, 3 * k + 1)
            table += DESCRIPTOR.pack(self.data + BLOCK * k, BLOCK, NEXT | WRITE, 3 * k + 2)
            table += DESCRIPTOR.pack(self.status + k, 1, WRITE, 0)
        mem.write(self.desc, table)

    def queue(self) -> SplitQueue:
        return SplitQueue(self.mem, QUEUE_SIZE, self.desc, self.avail, self.used)

    def post(self) -> None:
        """Fill every slot with a read of the next 4 KiB and publish them."""
        headers = bytearray()
        for _ in range(self.depth):
            headers += HEADER.pack(VIRTIO_BLK_T_IN, 0, self.next_sector)
            self.next_sector = (self.next_sector + BLOCK // SECTOR) % (FILE_SIZE // SECTOR)
        self.mem.write(self.headers, headers)
        first = self.avail_idx % QUEUE_SIZE
        ring = struct.pack(f"<{self.depth}H", *(3 * k for k in range(self.depth)))
        self.mem.write(self.avail + 4 + 2 * first, ring)  # depth divides QUEUE_SIZE
        self.avail_idx = (self.avail_idx + self.depth) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def reap(self) -> int:
        """How many requests completed since the last reap."""
        idx = int.from_bytes(self.mem.read(self.used + 2, 2), "little")
        done, self.used_seen = (idx - self.used_seen) & 0xFFFF, idx
        return done


class _Device:
    """The VMM's virtio-blk device, and the same steps again with a clock around each part."""

    def __init__(self, mem: gm.GuestMemory, queue: SplitQueue, fd: int) -> None:
        self.mem = mem
        self.queue = queue
        self.fd = fd
        self.model = VirtioBlock.over_fd(mem, os.dup(fd))
        self.model.activate([queue], 0, lambda: None)  # requests are used within a kick

    def serve(self) -> int:
        """Serve every available request with the VMM's device; return how many."""
        before = self.model.requests
        self.model.notify(0)
        return self.model.requests - before

    def close(self) -> None:
        self.model.close()

    def serve_timed(self, clock: list[int]) -> int:
        """:meth:`serve` with the clock read around each part: ``clock`` gets ring, copy, io."""
        now = time.perf_counter_ns
        mem, queue, io, fd = self.mem, self.queue, self.mem.dma.io, self.fd
        served = 0
        while True:
            t0 = now()
            chain: DescriptorChain | None = queue.pop()
            t1 = now()
            clock[0] += t1 - t0
            if chain is None:
                return served
            header = mem.read(chain.readable[0][0], HEADER.size)
            t2 = now()
            _, _, sector = HEADER.unpack(header)
            *data, (status, _) = chain.writable
            t3 = now()
            got = io.preadv_from(fd, data, sector * SECTOR)
            t4 = now()
            mem.fill(status, 1, VIRTIO_BLK_S_OK)
            t5 = now()
            queue.push(chain.head, got + 1)
            t6 = now()
            clock[0] += t6 - t5
            clock[1] += (t2 - t1) + (t5 - t4)
            clock[2] += t4 - t3
            served += 1


def _run_depth(mem: gm.GuestMemory, fd: int, depth: int, requests: int) -> dict[str, float]:
    driver = _Driver(mem, depth)
    device = _Device(mem, driver.queue(), fd)
    try:
        return _measure(driver, device, depth, requests)
    finally:
        device.close()


def _measure(driver: _Driver, device: _Device, depth: int, requests: int) -> dict[str, float]:
    rounds = max(1, requests // depth)
    device_ns = total_ns = 0
    start = time.perf_counter_ns()
    for _ in range(rounds):
        driver.post()
        t = time.perf_counter_ns()
        served = device.serve()
        device_ns += time.perf_counter_ns() - t
        if served != depth or driver.reap() != depth:
            raise RuntimeError(f"served {served} of {depth} requests")
    total_ns = time.perf_counter_ns() - start
    clock = [0, 0, 0]
    timed_ns = 0
    for _ in range(rounds):
        driver.post()
        t = time.perf_counter_ns()
        device.serve_timed(clock)
        timed_ns += time.perf_counter_ns() - t
        driver.reap()
    n = rounds * depth
    return {
        "device_rate": n / device_ns * 1e9,
        "end_to_end_rate": n / total_ns * 1e9,
        "ring_ns": clock[0] / n,
        "copy_ns": clock[1] / n,
        "syscall_ns": clock[2] / n,
        "other_ns": (timed_ns - sum(clock)) / n,
    }


def _floor_ns(fd: int, requests: int) -> float:
    buf = bytearray(BLOCK)
    start = time.perf_counter_ns()
    for i in range(requests):
        os.preadv(fd, [buf], (i * BLOCK) % FILE_SIZE)
    return (time.perf_counter_ns() - start) / requests


def run(
    depths: tuple[int, ...] = (1, 32),
    requests: int = 32768,
    repeats: int = 5,
    mode: gm.TagMode | str = "auto",
) -> dict[str, Any]:
    """Figures per queue depth (medians of ``repeats`` runs), and where they were taken."""
    with tempfile.TemporaryFile() as f, gm.GuestMemory.anonymous(MEMORY, GPA, tags=mode) as mem:
        f.write(os.urandom(FILE_SIZE))
        f.flush()
        fd = f.fileno()
        os.pread(fd, FILE_SIZE, 0)  # in the page cache from here on
        figures = []
        for depth in depths:
            runs = [_run_depth(mem, fd, depth, requests) for _ in range(repeats)]
            floors = [_floor_ns(fd, requests) for _ in range(repeats)]
            median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            figures.append(
                Figure(
                    depth=depth,
                    requests=requests,
                    floor_ns=statistics.median(floors),
                    **median,
                )
            )
        return {
            "schema": "guestmem-bench-virtio-blk/1",
            "where": where_it_ran(),
            "tag_mode": mem.tag_mode.name,
            "io_route": mem.policy.io.name,
            "repeats": repeats,
            "figures": [asdict(x) for x in figures],
        }


def print_report(report: dict[str, Any]) -> None:
    """The figures as a table."""
    print(
        f"virtio-blk 4 KiB reads from a cached file, {report['where']}, "
        f"{report['tag_mode']} tags, I/O route {report['io_route']}, "
        f"medians of {report['repeats']}"
    )
    head = (
        f"{'QD':>3} {'device req/s':>13} {'end-to-end':>11} {'ring ns':>8} {'copy ns':>8} "
        f"{'syscall ns':>10} {'other ns':>9} {'preadv alone':>12}"
    )
    print(head)
    for x in report["figures"]:
        print(
            f"{x['depth']:>3} {x['device_rate']:>13,.0f} {x['end_to_end_rate']:>11,.0f} "
            f"{x['ring_ns']:>8.0f} {x['copy_ns']:>8.0f} {x['syscall_ns']:>10.0f} "
            f"{x['other_ns']:>9.0f} {x['floor_ns']:>12.0f}"
        )
