"""QEMU 10 as the frontend of a real vhost-user-blk backend (host lane).

An x86_64 guest (Debian's amd64 kernel under TCG, with the initramfs of
scripts/x86-guest.sh) has one disk, a vhost-user-blk-pci device whose backend
is a separate process on a Unix socket; its RAM is a shared memfd the backend
maps. Inside, tests/guest-x86/vublk_check.c reads the whole disk (written by
the host) with O_DIRECT and checks every byte, writes a plan of extents
(first and last sectors, 512-byte and 4 KiB alignments, several segments per
request, groups of four at once, later writes over earlier ones), reads each
back, fsyncs and reads the whole disk again; the host then checks the image
byte for byte. In a second mode the guest keeps writing the disk, reading it
into buffers only the backend writes and re-checking them and a RAM region
while QEMU live-migrates it to a second QEMU: the backend's dirty log is what
brings the backend's writes to the target, and the same migration with the
log replaced by a decoy fails the guest's check. The backend is a parameter:
qemu-storage-daemon here, proving the harness; guestmem's own backend joins it
as a second one.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from conftest import FIGURES
from vhost_user_decoy_log import DecoyLogRelay
from x86_guest import (
    BACKENDS,
    RESULT,
    SECTOR,
    Backend,
    Console,
    Qmp,
    first_difference,
    guest_files,
    make_plan,
    migrate_generations,
    migrate_write_extent,
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
READY = re.compile(rb"VHOST-MIG-READY|VHOST-BLK-CHECK fail[^\r\n]*")
GUEST_TIMEOUT = 600.0  # TCG on a loaded two-core machine; it takes seconds when idle
MIGRATION_BANDWIDTH = 64 << 20  # bytes/s: a pre-copy of 1-2 s, several dirty syncs
VHOST_USER_SET_LOG_BASE = 6
DECOY_RESULT_TIMEOUT = 60.0  # a guest whose rings went stale may hang rather than fail


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
    process = backend([socket], image, log)
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
            qemu_command(kernel, initramfs, socket, f"file:{console}", append),
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


@dataclass
class Migration:
    """How a migration of the busy guest went."""

    status: dict[str, Any]  # the source's query-migrate at the end
    result: re.Match[bytes] | None  # the migrated guest's result line, if it printed one
    console: str  # the tail of the target's console
    booted: float  # seconds from the source QEMU's start to the guest's check running


def migrate_busy_guest(
    guest: tuple[Path, Path],
    backend: Backend,
    tmp_path: Path,
    image: Path,
    result_timeout: float,
    decoy_log: bool = False,
) -> Migration:
    """Boot the guest's migration check, migrate it to a second QEMU, stop it there.

    The backend serves both QEMUs (the target's frontend connects when it
    starts, while the source's is still served). With ``decoy_log`` the
    source's backend is reached through a relay that hands it a decoy in place
    of QEMU's dirty log: a backend that does not log.
    """
    kernel, initramfs = guest
    vu = [tmp_path / "source-vu.sock", tmp_path / "target-vu.sock"]
    backend_log = tmp_path / "backend.log"
    served = backend(vu, image, backend_log)
    qemus: list[subprocess.Popen[bytes]] = []
    consoles: list[Console] = []
    relay = None

    def start(name: str, socket: Path, *extra: str) -> tuple[Console, Qmp]:
        with open(tmp_path / f"{name}-qemu.log", "wb") as log:
            qemus.append(
                subprocess.Popen(
                    qemu_command(
                        kernel,
                        initramfs,
                        socket,
                        "chardev:console",
                        f"vublk.seed={SEED:x} vublk.mode=migrate",
                        (
                            "-chardev",
                            f"socket,id=console,path={tmp_path}/{name}-console.sock,"
                            "server=on,wait=off",
                            "-qmp",
                            f"unix:{tmp_path}/{name}-qmp.sock,server=on,wait=off",
                            "-trace",
                            f"enable=vhost_user_write,file={tmp_path}/{name}-trace.log",
                            *extra,
                        ),
                    ),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        consoles.append(Console(tmp_path / f"{name}-console.sock"))
        return consoles[-1], Qmp(tmp_path / f"{name}-qmp.sock")

    try:
        wait_for_socket(served, vu[1], backend_log)
        source_vu = vu[0]
        if decoy_log:
            source_vu = tmp_path / "relay.sock"
            relay = DecoyLogRelay(source_vu, vu[0])
        started = time.monotonic()
        source_console, source = start("source", source_vu)
        ready = source_console.wait_for(READY, GUEST_TIMEOUT)
        if not ready or ready.group(0) != b"VHOST-MIG-READY":
            pytest.fail(f"the guest's check never started; its console:\n{source_console.tail()}")
        booted = time.monotonic() - started
        target_console, target = start("target", vu[1], "-incoming", f"unix:{tmp_path}/mig.sock")
        assert target.execute("query-status") == {"status": "inmigrate", "running": False}
        limits = {"max-bandwidth": MIGRATION_BANDWIDTH, "downtime-limit": 1000}
        source.execute("migrate-set-parameters", **limits)
        source.execute("migrate", uri=f"unix:{tmp_path}/mig.sock")
        status = wait_for_migration(source, GUEST_TIMEOUT)
        assert status["status"] == "completed", f"migration: {status}"
        assert status["ram"]["dirty-sync-count"] >= 2, status
        if not decoy_log:  # else its guest may already have failed and powered off
            assert target.execute("query-status") == {"status": "running", "running": True}
        source.execute("quit")
        assert qemus[0].wait(60) == 0
        log_messages = (tmp_path / "source-trace.log").read_text()
        assert re.search(rf"vhost_user_write req:{VHOST_USER_SET_LOG_BASE} ", log_messages), (
            "QEMU never gave the source's backend a dirty log (SET_LOG_BASE)"
        )
        if relay is not None:
            assert relay.decoy_logs >= 1, "the relay never replaced a dirty log"

        target_console.send(b"stop\n")
        found = target_console.wait_for(RESULT, result_timeout)
        if found and found.group(1) == b"ok":
            assert qemus[1].wait(60) == 0
        migration = Migration(status, found, target_console.tail(), booted)
    finally:
        for console in consoles:
            console.close()
        for qemu in qemus:
            stop(qemu)
        if relay is not None:
            relay.close()
        backend_status = stop(served)
    assert backend_status == 0, backend_log.read_text(errors="replace")[-2000:]
    return migration


def test_live_migration_keeps_guest_ram_and_disk_exact(
    guest: tuple[Path, Path], backend: Backend, tmp_path: Path
) -> None:
    """QEMU migrates the guest to a second QEMU while it reads, writes and checks.

    During pre-copy QEMU hands the source's backend a dirty log (SET_LOG_BASE
    with a shared-memory fd) and sets VHOST_F_LOG_ALL: the guest pages the
    backend writes (disk reads, used rings) reach the target only through that
    log, and the guest re-checks them there. The image is checked after.
    """
    sectors = DISK_MIB * 1024 * 1024 // SECTOR
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(SEED, np.zeros(sectors, dtype=np.uint64)))
    migration = migrate_busy_guest(guest, backend, tmp_path, image, GUEST_TIMEOUT)
    if not migration.result:
        pytest.fail(f"no result from the migrated guest; its console:\n{migration.console}")
    assert migration.result.group(1) == b"ok", (
        f"the migrated guest's check failed: {migration.result.group(0)!r}"
    )

    fields = dict(item.split(b"=") for item in migration.result.group(2).split())
    rounds = int(fields[b"rounds"])
    assert rounds > 0
    written = sum(migrate_write_extent(r, sectors)[1] for r in range(1, rounds + 1)) * SECTOR
    assert int(fields[b"written"]) == written
    expected = pattern(SEED, migrate_generations(rounds, sectors))
    got = image.read_bytes()
    if got != expected:
        at = first_difference(got, expected)
        pytest.fail(f"the image differs from the guest's writes at byte {at}")
    status = migration.status
    FIGURES["x86 guest under TCG: QEMU start to the migration check running (s)"] = round(
        migration.booted, 1
    )
    FIGURES["x86 guest migration over vhost-user-blk: total, downtime (ms)"] = (
        f"{status['total-time']}, {status['downtime']}"
    )
    FIGURES["x86 guest migration over vhost-user-blk: guest rounds (2 I/Os each)"] = rounds


def test_a_backend_that_does_not_log_fails_the_migration_check(
    guest: tuple[Path, Path], backend: Backend, tmp_path: Path
) -> None:
    """The same migration with the source's backend writing a decoy log: the guest notices."""
    sectors = DISK_MIB * 1024 * 1024 // SECTOR
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(SEED, np.zeros(sectors, dtype=np.uint64)))
    migration = migrate_busy_guest(
        guest, backend, tmp_path, image, DECOY_RESULT_TIMEOUT, decoy_log=True
    )
    assert migration.result is None or migration.result.group(1) == b"fail", (
        f"the guest's check passed although its backend's writes were never logged: "
        f"{migration.result.group(0)!r}"
    )


def wait_for_migration(qmp: Qmp, timeout: float) -> dict[str, Any]:
    """query-migrate until the migration ends (completed, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = cast(dict[str, Any], qmp.execute("query-migrate"))
        if status.get("status") in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.2)
    pytest.fail(f"the migration did not end in {timeout:.0f} s: {status}")
