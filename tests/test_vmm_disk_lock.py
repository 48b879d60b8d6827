"""Disk image locks (guestmem.devices.disk_lock): never two VMMs on one image.

OFD locks belong to an open file description, so two devices over one image
in this process conflict as two VMMs would; a child process shows the same
for another process. Host lane, SOFTWARE memory.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import guestmem as gm
from guestmem.devices import virtio_blk as blk
from guestmem.devices.disk_lock import DiskLock, DiskLockedError, acquire_all
from guestmem.vmm.machine import Machine

BASE = 0x4000_0000
RAM = 1 << 20


@pytest.fixture
def mem() -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.anonymous(RAM, gpa=BASE, tags=gm.TagMode.SOFTWARE) as memory:
        yield memory


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * blk.SECTOR))
    return path


def refused(mem: gm.GuestMemory, image: Path, *, read_only: bool) -> DiskLockedError:
    with pytest.raises(DiskLockedError) as err:
        blk.VirtioBlock(mem, str(image), read_only=read_only)
    return err.value


# (first disk read-only, second disk read-only) -> whether the second may run
PAIRS = {
    (False, False): False,
    (False, True): False,
    (True, False): False,
    (True, True): True,
}


@pytest.mark.parametrize(("first_ro", "second_ro"), sorted(PAIRS))
def test_a_second_disk_on_one_image(
    mem: gm.GuestMemory, image: Path, first_ro: bool, second_ro: bool
) -> None:
    first = blk.VirtioBlock(mem, str(image), read_only=first_ro)
    try:
        assert first.locked
        if PAIRS[first_ro, second_ro]:
            second = blk.VirtioBlock(mem, str(image), read_only=second_ro)
            assert second.locked
            second.close()
        else:
            err = refused(mem, image, read_only=second_ro)
            assert str(image) in str(err)
            assert err.path == str(image)
            assert err.shared is second_ro
            assert err.errno == errno.EAGAIN
            assert isinstance(err, gm.GuestMemoryError)
            assert isinstance(err, OSError)
            assert ("read lock" if second_ro else "write lock") in str(err)
            assert first.locked
    finally:
        first.close()


def test_a_refused_disk_leaves_no_open_image(mem: gm.GuestMemory, image: Path) -> None:
    with_fds = Path("/proc/self/fd")
    first = blk.VirtioBlock(mem, str(image))
    try:
        before = sorted(os.listdir(with_fds))
        refused(mem, image, read_only=False)
        assert sorted(os.listdir(with_fds)) == before
    finally:
        first.close()


def test_unlock_lets_another_lock(mem: gm.GuestMemory, image: Path) -> None:
    first = blk.VirtioBlock(mem, str(image))
    first.unlock()
    first.unlock()  # idempotent
    assert not first.locked
    second = blk.VirtioBlock(mem, str(image))
    with pytest.raises(DiskLockedError, match=f"disk image {image} is in use"):
        first.lock()
    assert not first.locked
    second.close()
    first.close()


def test_lock_hand_over_as_a_migration_does(mem: gm.GuestMemory, image: Path) -> None:
    source = blk.VirtioBlock(mem, str(image))
    target = blk.VirtioBlock(mem, str(image), locked=False)
    assert source.locked
    assert not target.locked
    with pytest.raises(DiskLockedError):
        target.lock()  # too early: the source still runs
    source.unlock()  # the go-ahead
    target.lock()  # before the target runs
    target.lock()  # idempotent
    assert target.locked
    assert not source.locked
    with pytest.raises(DiskLockedError):
        source.lock()  # the source can never take it back while the target runs
    source.close()
    target.close()


def test_close_releases_the_lock(mem: gm.GuestMemory, image: Path) -> None:
    first = blk.VirtioBlock(mem, str(image))
    first.close()
    assert not first.locked
    first.unlock()  # nothing held: nothing to do
    with pytest.raises(gm.UsageError, match="closed"):
        first.lock()
    second = blk.VirtioBlock(mem, str(image))
    second.close()


def test_an_unlocked_disk_still_serves_its_image(mem: gm.GuestMemory, image: Path) -> None:
    holder = blk.VirtioBlock(mem, str(image))
    quiet = blk.VirtioBlock(mem, str(image), locked=False)
    assert quiet.size == holder.size == 64 * blk.SECTOR
    quiet.close()
    holder.close()


HOLD = """
    import sys
    import guestmem as gm
    from guestmem.devices import virtio_blk as blk
    with gm.GuestMemory.anonymous(1 << 20, gpa=0x4000_0000, tags=gm.TagMode.SOFTWARE) as mem:
        disk = blk.VirtioBlock(mem, sys.argv[1], read_only=sys.argv[2] == "ro")
        print("locked", flush=True)
        sys.stdin.read()
"""


@pytest.mark.parametrize("held", ["rw", "ro"])
def test_another_process_is_refused(mem: gm.GuestMemory, image: Path, held: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), str(image), held],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "locked\n"
        err = refused(mem, image, read_only=False)
        assert str(image) in str(err)
        if held == "ro":
            blk.VirtioBlock(mem, str(image), read_only=True).close()
        else:
            refused(mem, image, read_only=True)
    finally:
        child.communicate("", timeout=60)
    assert child.returncode == 0
    blk.VirtioBlock(mem, str(image)).close()  # the process ended, its lock with it


def test_a_second_process_sees_the_error_naming_the_image(mem: gm.GuestMemory, image: Path) -> None:
    disk = blk.VirtioBlock(mem, str(image))
    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(HOLD), str(image), "rw"],
            input="",
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        disk.close()
    assert result.returncode != 0
    assert "DiskLockedError" in result.stderr
    assert f"disk image {image} is in use: failed to get its write lock" in result.stderr


def open_locks(image: Path, count: int) -> list[DiskLock]:
    return [DiskLock(os.open(image, os.O_RDWR), str(image), shared=False) for _ in range(count)]


def test_acquire_all_is_all_or_nothing(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(bytes(blk.SECTOR))
    mine = [*open_locks(image, 1), *open_locks(other, 1)]
    blocker = open_locks(other, 1)[0]
    try:
        blocker.acquire()
        with pytest.raises(DiskLockedError, match=str(other)):
            acquire_all(mine)
        assert [lock.held for lock in mine] == [False, False]
        check = open_locks(image, 1)[0]
        check.acquire()  # the first image was released again
        check.release()
        os.close(check.fd)
        blocker.release()
        acquire_all(mine)
        assert [lock.held for lock in mine] == [True, True]
    finally:
        for lock in [*mine, blocker]:
            os.close(lock.fd)


def test_acquire_all_keeps_locks_held_before(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(bytes(blk.SECTOR))
    mine = [*open_locks(image, 1), *open_locks(other, 1)]
    blocker = open_locks(other, 1)[0]
    try:
        mine[0].acquire()
        blocker.acquire()
        with pytest.raises(DiskLockedError):
            acquire_all(mine)
        assert [lock.held for lock in mine] == [True, False]
    finally:
        for lock in [*mine, blocker]:
            os.close(lock.fd)


def test_machine_locks_its_disks_all_or_nothing(
    mem: gm.GuestMemory, image: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(bytes(blk.SECTOR))
    # No arm64 KVM here: a Machine with only its disks, which is all these methods use.
    machine = Machine.__new__(Machine)
    machine.disks = [blk.VirtioBlock(mem, str(p), locked=False) for p in (image, other)]
    blocker = blk.VirtioBlock(mem, str(other), read_only=True)
    try:
        with pytest.raises(DiskLockedError, match=f"disk image {other} is in use"):
            machine.lock_disks()
        assert [disk.locked for disk in machine.disks] == [False, False]
        blocker.close()
        machine.lock_disks()
        assert [disk.locked for disk in machine.disks] == [True, True]
        refused(mem, image, read_only=True)
        machine.unlock_disks()
        machine.unlock_disks()
        assert [disk.locked for disk in machine.disks] == [False, False]
        blk.VirtioBlock(mem, str(image)).close()
    finally:
        for disk in machine.disks:
            disk.close()
