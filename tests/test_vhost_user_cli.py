"""``guestmem vhost-user-blk``: the command line the QEMU harness starts.

Served through its socket to the synthetic frontend, twice (a fresh device
each time), then ended by SIGTERM with exit status 0 and the socket gone;
operator errors are one line on stderr and exit status 1 (2 for argparse's).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import guestmem as gm
from vhost_user_frontend import SECTOR, Frontend

COMMAND = [sys.executable, "-m", "guestmem", "vhost-user-blk"]


def _wait_for(path: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the socket never appeared"
        time.sleep(0.05)


def test_serves_frontends_in_turn_and_ends_on_sigterm(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * SECTOR))
    path = str(tmp_path / "blk.sock")
    proc = subprocess.Popen(
        [*COMMAND, "--socket", path, "--disk", str(disk)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(path, proc)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for round_ in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            front = Frontend(sock)
            try:
                front.start()
                front.mem.write(0x20000, bytes([round_ + 1]) * SECTOR)
                assert front.request(1, round_, 0x20000, SECTOR) == 0
                assert front.get_vring_base() == 1, "a fresh device: its ring starts at 0"
            finally:
                front.close()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"serving {disk} on {path}" in err
    assert not os.path.exists(path)
    data = disk.read_bytes()
    assert data[:SECTOR] == b"\x01" * SECTOR
    assert data[SECTOR : 2 * SECTOR] == b"\x02" * SECTOR


def test_a_missing_disk_is_one_line_and_status_1(tmp_path: Path) -> None:
    done = subprocess.run(
        [*COMMAND, "--socket", str(tmp_path / "s"), "--disk", str(tmp_path / "absent.img")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("guestmem: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_bad_disk_option_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [*COMMAND, "--socket", str(tmp_path / "s"), "--disk", "x.img,rw"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "not FILE or FILE,ro" in done.stderr


@pytest.mark.skipif(gm.has_mte(), reason="HARDWARE is available on this MTE host")
def test_hardware_tags_without_mte_are_refused_before_listening(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SECTOR))
    done = subprocess.run(
        [*COMMAND, "--socket", str(tmp_path / "s"), "--disk", str(disk), "--tags", "hardware"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "MTE" in done.stderr
    assert not (tmp_path / "s").exists()
