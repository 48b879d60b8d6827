"""The reference VMM's parts that need no KVM: device tree, kernel loader, PL011, CLI.

They run on every lane (SOFTWARE memory on the host); the arm64-kernel lane
boots a real guest with them (test_vmm_boot.py).
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import guestmem as gm
from guestmem.devices import pl011
from guestmem.vmm import boot, fdt, layout

libfdt = pytest.importorskip("libfdt", reason="the VMM's device tree needs pylibfdt")

MIB = 1 << 20


def image(text_offset: int = 0, image_size: int = 3 * MIB, body: bytes = b"kernel") -> bytes:
    header = struct.pack("<II QQQ QQQ 4s I", 0, 0, text_offset, image_size, 0, 0, 0, 0,
                         boot.IMAGE_MAGIC, 0)  # fmt: skip
    return header + body


# ---- the device tree -----------------------------------------------------------------


def test_the_device_tree_describes_ram_cpus_gic_timer_uart_and_chosen() -> None:
    tree = fdt.BootTree(
        layout.RAM, 256 * MIB, 3, "console=ttyAMA0 quiet", (0x4800_0000, 0x4810_0000)
    )
    blob = libfdt.Fdt(fdt.build(tree))

    def prop(path: str, name: str) -> bytes:
        return bytes(blob.getprop(blob.path_offset(path), name))

    assert struct.unpack(">QQ", prop("/memory@40000000", "reg")) == (layout.RAM, 256 * MIB)
    assert prop("/chosen", "bootargs") == b"console=ttyAMA0 quiet\0"
    assert struct.unpack(">Q", prop("/chosen", "linux,initrd-start")) == (0x4800_0000,)
    assert struct.unpack(">Q", prop("/chosen", "linux,initrd-end")) == (0x4810_0000,)
    assert prop("/chosen", "stdout-path") == b"/pl011@9000000\0"
    cpus = [blob.path_offset(f"/cpus/cpu@{i}") for i in range(3)]
    assert all(offset >= 0 for offset in cpus)
    with pytest.raises(libfdt.FdtException):
        blob.path_offset("/cpus/cpu@3")
    assert prop("/cpus/cpu@2", "enable-method") == b"psci\0"
    assert prop("/psci", "method") == b"hvc\0"
    gic_reg = struct.unpack(">4Q", prop("/intc@8000000", "reg"))
    assert gic_reg == (layout.GIC_DIST, layout.GIC_DIST_SIZE, layout.GIC_REDIST, 3 * 0x20000)
    assert struct.unpack(">3I", prop("/pl011@9000000", "interrupts")) == (0, layout.UART_SPI, 4)
    timer = struct.unpack(">12I", prop("/timer", "interrupts"))
    assert timer[1::3] == (13, 14, 11, 10)


def test_each_virtio_transport_has_a_node_with_its_own_interrupt() -> None:
    blob = libfdt.Fdt(fdt.build(fdt.BootTree(layout.RAM, 64 * MIB, 1, "x", virtio_devices=2)))
    for index in range(2):
        base = layout.VIRTIO + index * layout.VIRTIO_SIZE
        node = blob.path_offset(f"/virtio_mmio@{base:x}")
        assert bytes(blob.getprop(node, "compatible")) == b"virtio,mmio\0"
        assert struct.unpack(">QQ", bytes(blob.getprop(node, "reg"))) == (base, layout.VIRTIO_SIZE)
        kind, spi, trigger = struct.unpack(">3I", bytes(blob.getprop(node, "interrupts")))
        assert (kind, spi) == (0, layout.VIRTIO_SPI + index)
        assert trigger == 1, "an irqfd pulses the line: the guest must take it as an edge"


def test_without_an_initrd_chosen_names_none() -> None:
    blob = libfdt.Fdt(fdt.build(fdt.BootTree(layout.RAM, 64 * MIB, 1, "x")))
    with pytest.raises(libfdt.FdtException):
        blob.getprop(blob.path_offset("/chosen"), "linux,initrd-start")


# ---- the kernel loader ---------------------------------------------------------------


def test_an_image_is_placed_on_2_mib_with_the_tree_and_initrd_above_it() -> None:
    kernel = boot.KernelImage.parse(image(text_offset=0x8_0000, image_size=5 * MIB))
    placed = boot.plan(layout.RAM, 64 * MIB, kernel, 4096)
    assert placed.entry == layout.RAM + 0x8_0000
    assert placed.dtb % (2 * MIB) == 0 and placed.dtb >= placed.entry + 5 * MIB
    assert placed.initrd == (placed.dtb + 2 * MIB, placed.dtb + 2 * MIB + 4096)


def test_a_gzipped_image_is_unpacked() -> None:
    assert boot.KernelImage.parse(gzip.compress(image(body=b"z" * 100))).data.endswith(b"z" * 100)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "too short"),
        (b"\x7fELF" + bytes(100), "not an arm64 Linux Image"),
        (b"\x1f\x8b" + bytes(30), "damaged gzip"),
    ],
)
def test_what_is_not_an_arm64_image_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(boot.BootError, match=message):
        boot.KernelImage.parse(data)


def test_a_guest_too_small_for_its_kernel_is_refused() -> None:
    kernel = boot.KernelImage.parse(image(image_size=30 * MIB))
    with pytest.raises(boot.BootError, match=r"need .* bytes of RAM; the guest has"):
        boot.plan(layout.RAM, 32 * MIB, kernel, 1 * MIB)


def test_loading_writes_every_piece_and_keeps_the_tags() -> None:
    kernel = boot.KernelImage.parse(image(body=b"K" * 5000))
    with gm.GuestMemory.anonymous(16 * MIB, gpa=layout.RAM, tags=gm.TagMode.SOFTWARE) as mem:
        mem.set_tags(layout.RAM, 16 * MIB, 7)
        placed = boot.plan(layout.RAM, 16 * MIB, kernel, 3)
        boot.load(mem, placed, kernel, b"INI", b"DTB")
        assert mem.read(placed.entry, len(kernel.data)) == kernel.data
        assert mem.read(placed.dtb, 3) == b"DTB"
        assert placed.initrd is not None and mem.read(placed.initrd[0], 3) == b"INI"
        assert set(mem.get_tags(layout.RAM, 16 * MIB).tolist()) == {7}


# ---- the PL011 -------------------------------------------------------------------------


class Line:
    def __init__(self) -> None:
        self.changes: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.changes.append(level)


def test_the_uart_sends_each_byte_at_once_and_raises_tx_until_cleared() -> None:
    out: list[bytes] = []
    line = Line()
    uart = pl011.Pl011(out.append, line)
    uart.write(pl011.IMSC, 4, pl011.INT_TX)
    uart.write(pl011.DR, 4, ord("h"))
    assert out == [b"h"]
    assert line.changes == [True]
    uart.write(pl011.DR, 4, ord("i"))
    assert out == [b"h", b"i"] and line.changes == [True]  # only level changes are driven
    uart.write(pl011.ICR, 4, pl011.INT_TX)
    assert line.changes == [True, False]
    assert uart.read(pl011.FR, 4) & pl011.FR_TXFE


def test_the_uart_receives_through_its_fifo_and_a_backlog() -> None:
    line = Line()
    uart = pl011.Pl011(lambda _data: None, line)
    uart.write(pl011.IMSC, 4, pl011.INT_RX)
    assert uart.read(pl011.FR, 4) & pl011.FR_RXFE
    uart.receive(bytes(range(40)))
    assert line.changes == [True]
    assert uart.read(pl011.FR, 4) & pl011.FR_RXFF
    got = []
    while not uart.read(pl011.FR, 4) & pl011.FR_RXFE:
        got.append(uart.read(pl011.DR, 4))
    assert got == list(range(40))
    assert line.changes == [True, False]
    assert uart.read(pl011.DR, 4) == 0  # an empty FIFO reads 0


def test_the_uart_identifies_as_a_pl011() -> None:
    uart = pl011.Pl011(lambda _data: None, lambda _level: None)
    ids = [uart.read(offset, 4) for offset in range(0xFE0, 0x1000, 4)]
    assert ids == [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]


# ---- the command line ----------------------------------------------------------------


def vmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guestmem", "vmm", "run", *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_a_missing_kernel_is_one_line_and_status_1(tmp_path: Path) -> None:
    result = vmm("--kernel", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "nothing" in result.stderr


def test_a_file_that_is_no_kernel_is_one_line_and_status_1(tmp_path: Path) -> None:
    (tmp_path / "Image").write_bytes(b"#!/bin/sh\n" * 10)
    result = vmm("--kernel", str(tmp_path / "Image"))
    assert result.returncode == 1
    assert "not an arm64 Linux Image" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--memory", "lots"],
        ["--cpus", "0"],
        ["--tags", "software"],
        [],
        ["--disk", ",ro"],
        ["--disk", "a.img,rw"],
        ["--gdb", "nowhere"],
    ],
    ids=["memory", "cpus", "tags", "no-kernel", "disk-no-path", "disk-option", "gdb"],
)
def test_bad_flags_get_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    kernel = ["--kernel", str(tmp_path / "Image")] if args else []
    result = vmm(*kernel, *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_without_kvm_mte_the_vmm_says_so(tmp_path: Path) -> None:
    if gm.kvm_mte_available():
        pytest.skip("KVM with MTE is here: test_vmm_boot.py boots real guests instead")
    (tmp_path / "Image").write_bytes(image())
    result = vmm("--kernel", str(tmp_path / "Image"), "--memory", "64M")
    assert result.returncode == 1
    assert "kvm" in result.stderr.lower() and result.stderr.count("\n") == 1, result.stderr
