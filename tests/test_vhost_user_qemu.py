"""QEMU 10 as the frontend of a real vhost-user-blk backend (host lane).

An x86_64 guest (Debian's amd64 kernel under TCG, with the initramfs of
scripts/x86-guest.sh) has one disk, a vhost-user-blk-pci device whose backend
is a separate process on a Unix socket; its RAM is a shared memfd the backend
maps. Inside, tests/guest-x86/vublk_check.c reads the whole disk (written by
the host) with O_DIRECT and checks every byte, writes a plan of extents
(first and last sectors, 512-byte and 4 KiB alignments, several segments per
request, groups of four at once, later writes over earlier ones), reads each
back, fsyncs and reads the whole disk again; the host then checks the image
byte for byte. The backend is a parameter: qemu-storage-daemon here, proving
the harness; guestmem's own backend joins it as a second one.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import FIGURES
from x86_guest import (
    BACKENDS,
    SECTOR,
    Backend,
    first_difference,
    guest_files,
    make_plan,
    pattern,
    plan_argument,
    qemu_command,
    sector_generations,
    stop,
    wait_for_result,
    wait_for_socket,
)

DISK_MIB = 32
SEED = 0x5EED_2100_C0FF_EE21
GUEST_TIMEOUT = 600.0  # TCG on a loaded two-core machine; it takes seconds when idle


@pytest.fixture(scope="module")
def guest() -> tuple[Path, Path]:
    """The guest's kernel and initramfs."""
    return guest_files()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each vhost-user-blk backend the guest's disk is served by."""
    return BACKENDS[request.param]


@pytest.fixture
def served_disk(backend: Backend, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A disk image holding generation 0 of the pattern, served on a socket: (socket, image)."""
    sectors = DISK_MIB * 1024 * 1024 // SECTOR
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(SEED, np.zeros(sectors, dtype=np.uint64)))
    socket = tmp_path / "vhost-user-blk.sock"
    log = tmp_path / "backend.log"
    process = backend(socket, image, log)
    try:
        wait_for_socket(process, socket, log)
        yield socket, image
    finally:
        status = stop(process)
    assert status == 0, f"the backend exited {status}:\n{log.read_text(errors='replace')[-2000:]}"


def test_guest_io_through_vhost_user_blk_is_exact(
    guest: tuple[Path, Path], served_disk: tuple[Path, Path], tmp_path: Path
) -> None:
    kernel, initramfs = guest
    socket, image = served_disk
    sectors = image.stat().st_size // SECTOR
    groups = make_plan(SEED, sectors)
    append = f"vublk.seed={SEED:x} vublk.plan={plan_argument(groups)}"
    assert len(append) < 1500, "the kernel's command line holds 2048 bytes in all"
    console = tmp_path / "console.log"
    qemu_log = tmp_path / "qemu.log"
    started = time.monotonic()
    with open(qemu_log, "wb") as log:
        qemu = subprocess.Popen(
            qemu_command(kernel, initramfs, socket, console, append),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        outcome, detail = wait_for_result(qemu, console, GUEST_TIMEOUT)
        checked = time.monotonic() - started
        assert outcome == b"ok", f"the guest's check failed: {detail.decode()}"
        status = qemu.wait(60)  # the guest powers off
    finally:
        stop(qemu)
    assert status == 0, f"QEMU exited {status}:\n{qemu_log.read_text(errors='replace')[-2000:]}"

    written = sum(e.count for g in groups for e in g) * SECTOR
    fields = dict(item.split(b"=") for item in detail.split())
    assert int(fields[b"written"]) == written
    assert int(fields[b"bytes"]) == 2 * sectors * SECTOR + 2 * written  # two whole reads
    assert int(fields[b"extents"]) == sum(len(g) for g in groups)
    assert int(fields[b"groups"]) == len(groups)

    expected = pattern(SEED, sector_generations(groups, sectors))
    got = image.read_bytes()
    assert len(got) == len(expected)
    if got != expected:
        at = first_difference(got, expected)
        gen = sector_generations(groups, sectors)[at // SECTOR]
        pytest.fail(f"the image differs from the guest's writes at byte {at} (generation {gen})")
    FIGURES["x86 guest under TCG: QEMU start to the vhost-user disk check's result (s)"] = round(
        checked, 1
    )
    FIGURES["x86 guest under TCG: QEMU start to power-off and image checked (s)"] = round(
        time.monotonic() - started, 1
    )
