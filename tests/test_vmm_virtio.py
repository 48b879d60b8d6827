"""Device DMA under a real driver: virtio-blk in the reference VMM (arm64-kernel lane).

The nested guest loads virtio_mmio and virtio_blk, and its block probe does
O_DIRECT reads into, and writes from, a PROT_MTE buffer whose granules carry
varied tags: the VMM's device model moves that data with guestmem's
syscall-safe DMA route, never faulting, and the guest finds its bytes right
and its tags unchanged, while a wrong tag still faults. Then ordinary
page-cache I/O: mkfs, copy, drop caches, compare. Before the disk, a
virtio-console: the guest says hello on hvc0 and reads a line typed there.
Both tag modes, with the guest's kicks on ioeventfds served by the VMM's I/O
thread and its interrupts on irqfds; once more with neither (every kick an
MMIO exit, every interrupt a KVM_IRQ_LINE call), the fallback the VMM takes
where KVM lacks them.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

import guestmem as gm
from conftest import FIGURES, LANE
from test_vmm_boot import APPEND, BOOT_TIMEOUT, Console, guest_file

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        LANE != "arm64-kernel",
        reason="needs /dev/kvm with MTE and a guest kernel: the arm64-kernel lane runs these",
    ),
]

MIB = 1 << 20
DISK = 16 * MIB
READ_AT, WRITE_AT, SIZE = 1 * MIB, 12 * MIB, 64 * 1024  # tests/guest/blk_probe.c
BLK = re.compile(rb"BLK-PROBE read=(\w+) tags=(\w+) write=(\w+) fault=(\S+)\r?\n")
RATE = re.compile(rb"BLK-RATE qd1_4k_reads_per_second=(\d+) qd32_4k_reads_per_second=(\d+)\r?\n")
PAGECACHE = re.compile(rb"GUEST-PAGECACHE (ok|bad)")  # poweroff may cut its newline
HVC_HELLO = re.compile(rb"GUEST-HVC hello\r?\n")
HVC_READY = re.compile(rb"GUEST-HVC-READY\r?\n")
HVC_GOT = re.compile(rb"GUEST-HVC got=(\S*)\r?\n")


def in_byte(offset: int) -> int:
    return (offset * 13 + (offset >> 9)) & 0xFF


def out_byte(offset: int) -> int:
    return (offset * 29 + 7) & 0xFF


@pytest.mark.parametrize(
    ("tags", "eventfds"),
    [(gm.TagMode.HARDWARE, True), (gm.TagMode.KVM, True), (gm.TagMode.KVM, False)],
    ids=["HARDWARE", "KVM", "KVM-mmio-exits"],
)
def test_o_direct_into_tagged_pages_and_page_cache_io(
    tags: gm.TagMode, eventfds: bool, tmp_path: Path
) -> None:
    from guestmem.vmm.machine import Disk, Machine, MachineConfig, Outcome
    from guestmem.vmm.vcpu import install_kick_handler

    image = tmp_path / "disk.img"
    data = bytearray(DISK)
    data[READ_AT : READ_AT + SIZE] = bytes(in_byte(READ_AT + i) for i in range(SIZE))
    image.write_bytes(data)
    kernel, initrd = guest_file("GUESTMEM_GUEST_KERNEL"), guest_file("GUESTMEM_GUEST_INITRD")
    console = Console()
    config = MachineConfig(
        kernel,
        APPEND,
        initrd,
        memory=256 * MIB,
        cpus=2,
        tags=tags,
        disks=(Disk(str(image)),),
        virtio_console=True,
        eventfds=eventfds,
    )
    install_kick_handler()
    with Machine(config, console.write) as machine:
        outcome: list[Outcome] = []
        runner = threading.Thread(target=lambda: outcome.append(machine.run()), daemon=True)
        runner.start()
        try:
            console.wait_for(re.compile(rb"PROBE-READY[^\n]*\n"))
            machine.uart.receive(b"go\n")  # the MTE probe reads the UART; typing goes to hvc0
            console.wait_for(HVC_HELLO)  # written to hvc0 only: it came through the virtqueue
            console.wait_for(HVC_READY)
            machine.console_input(b"ping\n")
            hvc = console.wait_for(HVC_GOT)
            blk = console.wait_for(BLK)
            rate = console.wait_for(RATE)
            cached = console.wait_for(PAGECACHE)
        except BaseException:
            machine.stop("error", "the test failed")
            raise
        finally:
            runner.join(timeout=BOOT_TIMEOUT)
        requests = machine.disks[0].requests
        wired = machine.eventfds
        kicks = [(t.kicks_by_eventfd, t.kicks_by_exit) for t in machine.transports]
        edges = [line.edges for line in machine.interrupts]
        line_ioctls = [machine.gic.line_ioctls.get(line.spi, 0) for line in machine.interrupts]
    assert [o.reason for o in outcome] == ["power-off"], (outcome, console.text)
    assert blk[1] == b"ok", "O_DIRECT read into tagged pages brought the wrong bytes"
    assert blk[2] == b"ok", "the guest's tags changed under the device's DMA"
    assert blk[3] == b"ok" and blk[4] == b"SEGV_MTESERR"
    written = image.read_bytes()[WRITE_AT : WRITE_AT + SIZE]
    assert written == bytes(out_byte(WRITE_AT + i) for i in range(SIZE))
    assert cached[1] == b"ok", console.text
    assert hvc[1] == b"ping", console.text
    assert requests > 500
    assert wired is eventfds, "KVM in the lane offers irqfd and ioeventfd: the VMM must use them"
    assert all(edge > 0 for edge in edges), (edges, "each device interrupted the guest")
    if eventfds:  # the guest's kicks never reached the VMM as exits, its interrupts never ioctls
        assert all(by_eventfd > 0 and by_exit == 0 for by_eventfd, by_exit in kicks), kicks
        assert line_ioctls == [0] * len(edges), line_ioctls
    else:
        assert all(by_eventfd == 0 and by_exit > 0 for by_eventfd, by_exit in kicks), kicks
        assert line_ioctls == [2 * edge for edge in edges], (line_ioctls, edges)
    label = tags.name if eventfds else f"{tags.name}, kicks as MMIO exits"
    for depth, figure in (("QD1", rate[1]), ("QD32", rate[2])):
        FIGURES[f"vmm virtio-blk 4 KiB O_DIRECT reads/s at {depth} in the guest, {label}"] = int(
            figure
        )
        assert int(figure) > 0, "a timed O_DIRECT read failed in the guest"
