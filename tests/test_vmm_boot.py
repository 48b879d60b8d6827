"""The reference VMM boots a real guest with MTE in guestmem's memory (arm64-kernel lane).

Debian's kernel (the lane's own) boots under nested KVM with the project's
initramfs (tests/guest). Its MTE probe tags a locked page, proves a wrong
tag faults, and prints the page's physical address and tags; the VMM reads
those tags and bytes through guestmem while the guest runs, and the guest
then finds every tag and byte unchanged. In HARDWARE mode the VMM's own
mapping is tagged: the same read without a route kills the reader.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import guestmem as gm
from conftest import FIGURES, LANE
from guestmem.gdbstub.packets import PacketReader
from test_vmm_debug import Client

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        LANE != "arm64-kernel",
        reason="needs /dev/kvm with MTE and a guest kernel: the arm64-kernel lane runs these",
    ),
]

APPEND = "console=ttyAMA0 rdinit=/init quiet panic=-1"
BOOT_TIMEOUT = float(os.environ.get("GUESTMEM_GUEST_TIMEOUT", "300"))
READY = re.compile(
    rb"PROBE-READY va=(0x[0-9a-f]+) pa=(0x[0-9a-f]+) granules=(\d+) tags=([0-9a-f]+) "
    rb"fault=(\S+)\r?\n"
)  # whole lines: the console arrives a byte at a time
DONE = re.compile(rb"PROBE-DONE intact=(\w+) fault=(\S+)\r?\n")


def guest_file(variable: str) -> bytes:
    path = os.environ.get(variable)
    if not path or not os.path.exists(path):
        pytest.fail(f"{variable} names no file: the arm64-kernel lane puts the nested guest there")
    with open(path, "rb") as f:
        return f.read()


class Console:
    """What the guest wrote, and a way to wait for a line of it."""

    def __init__(self) -> None:
        self.text = b""
        self._changed = threading.Condition()

    def write(self, data: bytes) -> None:
        with self._changed:
            self.text += data
            self._changed.notify_all()

    def wait_for(
        self, pattern: re.Pattern[bytes], timeout: float = BOOT_TIMEOUT
    ) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (match := pattern.search(self.text)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {pattern.pattern!r} on the guest console:\n{self.text!r}")
                self._changed.wait(left)
        return match


class UnixClient(Client):
    """The RSP client over a Unix socket: the lane's VM has no network, not even loopback."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.reader = PacketReader(limit=1 << 22)
        self.pending = []


def read_until(vmm: subprocess.Popen[bytes], pattern: re.Pattern[bytes]) -> bytes:
    """The VMM's stdout up to a line matching ``pattern`` (fails after BOOT_TIMEOUT)."""
    assert vmm.stdout is not None
    seen = b""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while pattern.search(seen) is None:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([vmm.stdout], [], [], max(left, 0))
        chunk = os.read(vmm.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            vmm.kill()
            pytest.fail(f"no {pattern.pattern!r} from the VMM (exit {vmm.poll()}): {seen!r}")
        seen += chunk
    return seen


@pytest.fixture(scope="module")
def guest() -> tuple[bytes, bytes]:
    return guest_file("GUESTMEM_GUEST_KERNEL"), guest_file("GUESTMEM_GUEST_INITRD")


def naive_read_dies(address: int) -> bool:
    """Whether reading 16 bytes at ``address`` with an untagged pointer kills a forked child."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # the child is meant to die: no traceback on the console
        ctypes.string_at(address, 16)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV


@pytest.mark.parametrize("tags", [gm.TagMode.HARDWARE, gm.TagMode.KVM], ids=lambda m: m.name)
def test_a_guest_tags_its_memory_and_the_vmm_reads_the_tags_while_it_runs(
    guest: tuple[bytes, bytes], tags: gm.TagMode
) -> None:
    from guestmem.vmm.machine import Machine, MachineConfig, Outcome
    from guestmem.vmm.vcpu import install_kick_handler

    kernel, initrd = guest
    console = Console()
    config = MachineConfig(kernel, APPEND, initrd, memory=256 << 20, cpus=2, tags=tags)
    install_kick_handler()
    started = time.monotonic()
    with Machine(config, console.write) as machine:
        outcome: list[Outcome] = []
        runner = threading.Thread(target=lambda: outcome.append(machine.run()), daemon=True)
        runner.start()
        try:
            ready = console.wait_for(READY)
            booted = time.monotonic() - started
            assert b"mte=yes" in console.text, console.text
            assert ready[5] == b"SEGV_MTESERR", "a wrong tag did not fault in the guest"
            pa, granules = int(ready[2], 16), int(ready[3])
            expected = [int(c, 16) for c in ready[4].decode()]
            assert machine.memory is not None
            seen = machine.memory.get_tags(pa, granules * 16)
            assert seen.tolist() == expected
            data = machine.memory.read(pa, granules * 16, access=gm.Access.DEBUG)
            assert data == b"".join(bytes([0x40 + i]) * 16 for i in range(granules))
            if tags is gm.TagMode.HARDWARE:
                region = machine.memory.regions[0]
                tagged = next(i for i, t in enumerate(expected) if t != 0)
                host = region.host_address + pa - region.gpa + 16 * tagged
                assert naive_read_dies(host), "an untagged read of tagged guest RAM did not fault"
            machine.console_input(b"go\n")
            done = console.wait_for(DONE)
            assert done[1] == b"yes", "the guest's tags or bytes changed under the VMM's reads"
            assert done[2] == b"SEGV_MTESERR"
            mmio = console.wait_for(re.compile(rb"PROBE-MMIO reads_per_second=(\d+)\r?\n"))
            console.wait_for(re.compile(rb"GUEST-PROBE-EXIT 0\r?\n"))
        except BaseException:
            machine.stop("error", "the test failed")
            raise
        finally:
            runner.join(timeout=BOOT_TIMEOUT)
    assert [o.reason for o in outcome] == ["power-off"], (outcome, console.text)
    result = outcome[0]
    FIGURES[f"vmm start to guest probe, {tags.name} (s)"] = round(booted, 1)
    FIGURES[f"vmm MMIO exits/s through the Python dispatch, {tags.name}"] = int(mmio[1])
    assert result.mmio_exits >= 2000  # the probe's reads all reached the VMM


@pytest.mark.parametrize("tags", ["hardware", "kvm"])
def test_the_command_line_boots_the_guest_and_serves_it_to_gdb(
    guest: tuple[bytes, bytes], tags: str, tmp_path: Path
) -> None:
    kernel = os.environ["GUESTMEM_GUEST_KERNEL"]
    initrd = os.environ["GUESTMEM_GUEST_INITRD"]
    where = str(tmp_path / "gdb.sock")
    command = [sys.executable, "-m", "guestmem", "vmm", "run", "--kernel", kernel, "--initrd",
               initrd, "--append", APPEND, "--memory", "192M", "--tags", tags,
               "--gdb", f"unix:{where}"]  # fmt: skip
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as vmm:  # fmt: skip
        assert vmm.stdin is not None and vmm.stdout is not None
        seen = read_until(vmm, READY)
        # --gdb serves the running guest: stop it, read a vCPU's registers,
        # detach; the guest runs on (test_vmm_debug_guest.py goes further).
        client = UnixClient(where)
        assert client.ask(b"?")[:1] == b"T"
        assert client.ask(b"qfThreadInfo") == b"m1"
        assert len(client.ask(b"g")) == 2 * (33 * 8 + 4 + 8)  # x0..pc, cpsr, tag_ctl
        assert client.ask(b"D") == b"OK"
        client.close()
        vmm.stdin.write(b"go\n")
        vmm.stdin.flush()
        out, err = vmm.communicate(timeout=BOOT_TIMEOUT)
    seen += out
    assert vmm.returncode == 0, (seen, err)
    assert b"GDB: target remote " + where.encode() in err
    assert b"PROBE-DONE intact=yes fault=SEGV_MTESERR" in seen, seen
    assert b"GUEST-PROBE-EXIT 0" in seen
