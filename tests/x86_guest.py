"""The host lane's x86_64 guest on a vhost-user-blk disk: what it needs and how it runs.

scripts/x86-guest.sh fetches Debian's amd64 kernel and builds the guest's
initramfs (tests/guest-x86); QEMU 10 boots it under TCG with its disk served
by a vhost-user-blk backend process over a Unix socket. The guest's check
(tests/guest-x86/vublk_check.c) follows a plan of writes given on the kernel
command line; ``pattern`` and ``expected_image`` compute on the host what it
writes, so the image can be checked byte for byte afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from socket import AF_UNIX, SOCK_STREAM
from socket import socket as Socket

import numpy as np
import pytest

from conftest import LANE

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SECTOR = 512
# The guest's pattern: splitmix64 of seed + gen * GOLDEN + offset * OFFSET_MIX (mod 2**64).
GOLDEN = 0x9E3779B97F4A7C15
OFFSET_MIX = 0xD1B54A32D192ED03
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK = (1 << 64) - 1
RESULT = re.compile(rb"VHOST-BLK-CHECK (ok|fail)([^\r\n]*)\r?\n")
QEMU = "qemu-system-x86_64"
REPLY_TIMEOUT = 120.0  # seconds for a QMP reply
STORAGE_DAEMON = "qemu-storage-daemon"

# A backend: started for socket paths, a disk image and a log file, it serves
# that image as a vhost-user-blk device on each socket (one frontend each)
# until terminated. The migration test gives two sockets: QEMU connects to
# its backend when it starts, so the target's frontend connects while the
# source's is still served (qemu-storage-daemon serves one frontend per
# export at a time; two exports of one block node serve both).
Backend = Callable[[Sequence[Path], Path, Path], "subprocess.Popen[bytes]"]


def cannot_start(reason: str) -> None:
    """In CI the lane must run this: fail. Elsewhere skip, saying why."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: the host lane's vhost-user guest cannot start: {reason}")
    pytest.skip(f"the host lane's vhost-user guest cannot start here: {reason}")


def guest_files() -> tuple[Path, Path]:
    """The guest's kernel and initramfs (fetched and built once by scripts/x86-guest.sh)."""
    if LANE != "host":
        pytest.skip(f"x86_64 QEMU under TCG runs in the host lane, not in {LANE}")
    for tool in (QEMU, STORAGE_DAEMON, "gcc", "apt-get"):
        if shutil.which(tool) is None:
            cannot_start(f"{tool} is missing (scripts/host-deps.sh installs QEMU 10)")
    built = subprocess.run(
        ["bash", str(SCRIPTS / "x86-guest.sh")], capture_output=True, text=True, timeout=900
    )
    if built.returncode != 0:
        cannot_start(f"scripts/x86-guest.sh failed:\n{built.stderr[-3000:]}")
    kernel, initramfs = built.stdout.split()
    return Path(kernel), Path(initramfs)


# ---- the backends -----------------------------------------------------------------


def start_qemu_storage_daemon(
    paths: Sequence[Path], disk: Path, log: Path
) -> subprocess.Popen[bytes]:
    """QEMU's own vhost-user-blk backend serving ``disk`` (raw, writable) on each socket."""
    exports = []
    for n, path in enumerate(paths):
        exports += [
            "--export",
            f"type=vhost-user-blk,id=exp{n},node-name=disk,"
            f"addr.type=unix,addr.path={path},writable=on",
        ]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [STORAGE_DAEMON, "--blockdev", f"driver=file,node-name=disk,filename={disk}", *exports],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_guestmem_backend(paths: Sequence[Path], disk: Path, log: Path) -> subprocess.Popen[bytes]:
    """guestmem's vhost-user-blk backend serving ``disk`` on each socket (tags: none)."""
    sockets = [arg for path in paths for arg in ("--socket", str(path))]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "guestmem", "vhost-user-blk", *sockets, "--disk", str(disk)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


BACKENDS: dict[str, Backend] = {
    "qemu-storage-daemon": start_qemu_storage_daemon,
    "guestmem": start_guestmem_backend,
}


def wait_for_socket(process: subprocess.Popen[bytes], socket: Path, log: Path) -> None:
    """Wait until the backend listens on ``socket`` (or fail with its log)."""
    deadline = time.monotonic() + 30
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"the backend never listened on {socket} (exit {process.poll()}):\n"
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """End ``process`` (SIGTERM, then SIGKILL) and return its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


# ---- the plan and the pattern -----------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """One write of the plan: ``count`` sectors from ``start``, in ``segments`` buffers."""

    start: int
    count: int
    segments: int


def make_plan(seed: int, sectors: int) -> list[list[Extent]]:
    """Groups of writes: each group's extents are disjoint and written at once.

    First, one at a time, the disk's first and last sectors and shapes worth
    naming (4 KiB aligned, 512-byte aligned, 1 MiB in 16 segments, one that
    overwrites parts of two earlier ones); then groups of four concurrent
    writes at random places and sizes, which overwrite parts of earlier ones.
    """
    rng = random.Random(seed)
    groups = [
        [Extent(0, 1, 1)],
        [Extent(sectors - 1, 1, 1)],
        [Extent(8, 8, 1)],
        [Extent(17, 9, 2)],
        [Extent(4096 + 1, 2048, 16)],
        [Extent(sectors - 259, 256, 4)],
        [Extent(12, 10, 3)],
    ]
    for _ in range(4):
        group: list[Extent] = []
        while len(group) < 4:
            count = rng.choice([1, 7, 8, 9, 64, 255, 256, 1024])
            start = rng.randrange(0, sectors - count)
            if rng.random() < 0.5:
                start -= start % 8
            extent = Extent(start, count, rng.randint(1, min(8, count)))
            if all(e.start + e.count <= start or start + count <= e.start for e in group):
                group.append(extent)
        groups.append(group)
    return groups


def plan_argument(groups: list[list[Extent]]) -> str:
    """The plan as the guest reads it: ``vublk.plan=S:C:N,S:C:N/S:C:N...``."""
    return "/".join(",".join(f"{e.start}:{e.count}:{e.segments}" for e in g) for g in groups)


def migrate_write_extent(r: int, sectors: int) -> tuple[int, int]:
    """The extent (start, count) round ``r`` of the migration check writes (vublk_migrate.c)."""
    count = 1 + (r * 37) % 128
    start = (r * 7919) % (sectors - 128)
    if r % 2:
        start -= start % 8
    return start, count


def migrate_generations(rounds: int, sectors: int) -> np.ndarray:
    """The generation each sector holds after ``rounds`` rounds of the migration check."""
    gens = np.zeros(sectors, dtype=np.uint64)
    for r in range(1, rounds + 1):
        start, count = migrate_write_extent(r, sectors)
        gens[start : start + count] = r
    return gens


def sector_generations(groups: list[list[Extent]], sectors: int) -> np.ndarray:
    """The generation each sector holds after the plan (0: the host's, n: the n-th write)."""
    gens = np.zeros(sectors, dtype=np.uint64)
    n = 0
    for group in groups:
        for extent in group:
            n += 1
            gens[extent.start : extent.start + extent.count] = n
    return gens


def pattern(seed: int, gens: np.ndarray) -> bytes:
    """The bytes of a disk whose sector i holds generation ``gens[i]`` (the guest's pattern)."""
    offsets = np.arange(0, len(gens) * SECTOR, 8, dtype=np.uint64)
    words = np.repeat(gens, SECTOR // 8)
    z = np.uint64(seed & MASK) + words * np.uint64(GOLDEN) + offsets * np.uint64(OFFSET_MIX)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    data: bytes = z.astype("<u8").tobytes()
    return data


def first_difference(got: bytes, expected: bytes) -> int:
    """The offset of the first byte that differs (the lengths are equal)."""
    a = np.frombuffer(got, dtype=np.uint8)
    b = np.frombuffer(expected, dtype=np.uint8)
    return int(np.flatnonzero(a != b)[0])


# ---- QEMU -------------------------------------------------------------------------


def qemu_command(
    kernel: Path,
    initramfs: Path,
    socket: Path,
    serial: str,
    append: str,
    extra: tuple[str, ...] = (),
    memory_mib: int = 256,
) -> list[str]:
    """qemu-system-x86_64 under TCG, its RAM a shared memfd, its disk vhost-user-blk on ``socket``.

    vhost-user needs the guest's RAM in shared memory the backend can map
    (``memory-backend-memfd,share=on``). The console is ``-serial serial``;
    nothing else is attached (``-nodefaults``) but ``extra``, and a guest that
    powers off or panics ends QEMU (``-no-reboot``, ``panic=-1``).
    """
    return [
        QEMU,
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "q35,memory-backend=mem",
        "-accel",
        "tcg",
        "-m",
        f"{memory_mib}M",
        "-object",
        f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
        "-chardev",
        f"socket,id=vu,path={socket}",
        "-device",
        "vhost-user-blk-pci,chardev=vu",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initramfs),
        "-append",
        f"console=ttyS0 quiet panic=-1 {append}",
        "-display",
        "none",
        "-serial",
        serial,
        "-no-reboot",
        *extra,
    ]


def wait_for_result(
    qemu: subprocess.Popen[bytes], console: Path, timeout: float
) -> tuple[bytes, bytes]:
    """The guest check's result line (``ok``/``fail`` and the rest), or fail with the console."""
    deadline = time.monotonic() + timeout
    while True:
        text = console.read_bytes() if console.exists() else b""
        found = RESULT.search(text)
        if found:
            return found.group(1), found.group(2).strip()
        if qemu.poll() is not None:
            pytest.fail(
                f"QEMU ended (exit {qemu.returncode}) before the guest's check said how it went; "
                f"the console's tail:\n{text[-3000:].decode(errors='replace')}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"no result from the guest's check after {timeout:.0f} s; "
                f"the console's tail:\n{text[-3000:].decode(errors='replace')}"
            )
        time.sleep(0.1)


class Console:
    """A guest's serial console on a QEMU ``socket`` chardev: what it wrote, and lines to it."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.sock = connect_unix(path, timeout)
        self.output = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            with self._changed:
                if not data:
                    self._changed.notify_all()
                    return
                self.output += data
                self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes] | None:
        """The first match of ``pattern`` in the output, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = pattern.search(bytes(self.output))
                left = deadline - time.monotonic()
                if found or left <= 0 or not self._reader.is_alive():
                    return found
                self._changed.wait(min(left, 1.0))

    def send(self, line: bytes) -> None:
        """Type ``line`` on the guest's console (lost if QEMU has ended: its output says why)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(line)

    def tail(self) -> str:
        """The last of the output, for failure messages."""
        return bytes(self.output[-3000:]).decode(errors="replace")

    def close(self) -> None:
        """Disconnect from the console."""
        self.sock.close()


class Qmp:
    """A QMP client on a QEMU ``-qmp unix:PATH,server=on,wait=off`` socket."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.sock = connect_unix(path, timeout)
        # A QEMU whose main loop is stuck (a device waiting for its backend) never answers.
        self.sock.settimeout(REPLY_TIMEOUT)
        self.file = self.sock.makefile("rb")
        self._receive()  # the greeting
        self.execute("qmp_capabilities")

    def _receive(self) -> dict[str, object]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        message: dict[str, object] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: object) -> object:
        """Run ``command`` and return its result (events on the way are dropped)."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._receive()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")

    def close(self) -> None:
        """Disconnect from QMP."""
        self.file.close()
        self.sock.close()


def connect_unix(path: Path, timeout: float) -> Socket:
    """Connect to the Unix socket at ``path``, waiting up to ``timeout`` for it to listen."""
    deadline = time.monotonic() + timeout
    while True:
        sock = Socket(AF_UNIX, SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
