"""Live migrations that go wrong, against one running MTE guest: exactly one copy runs.

One source VMM (KVM tags, a virtio-blk disk, a GDB socket and a control
socket) boots the nested guest with ``mig_probe``, which keeps rewriting and
re-tagging its memory and checking every chunk it revisits. Then, in turn,
as a careless operator and a failing network would:

1. a second ``vmm run`` on the same disk image is refused;
2. the target is killed (SIGKILL) during pre-copy;
3. the target is stopped (SIGSTOP) once the source has paused the guest, and another is
   killed (SIGKILL) there;
4. a TLS target trusts another CA: the source's certificate is refused;
5. a GDB tag write lands while KVM logs dirty pages (E10 on Linux 6.12+,
   written and carried on 6.1);
6. the go-ahead is lost on the way (a relay swallows it): both VMMs hold
   the guest paused and say so; the operator resumes the source and quits
   the target;
7. finally a migration over TLS with mutual authentication succeeds, the
   disk lock goes with the guest, and the probe finds nothing lost.

After each failure the source's guest must run on with its checks passing,
and how long it was paused is recorded (docs/benchmarks.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import FIGURES, LANE
from test_vmm_boot import BOOT_TIMEOUT, UnixClient
from test_vmm_migration import (
    READY,
    TICK,
    Vmm,
    _check_resumed,
    _guest,
    _wait_for_socket,
    record_migration,
)
from tls_certs import Certificates, make_certificates

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        LANE != "arm64-kernel",
        reason="needs /dev/kvm with MTE and a guest kernel: the arm64-kernel lane runs these",
    ),
]

APPEND = "console=ttyAMA0 rdinit=/init quiet panic=-1 probe.mode=migrate mig.mib=16"
# Seconds each side waits on a silent peer. Under nested emulation a VMM busy
# with a 2-vCPU guest is starved for seconds at a time; on hardware the
# default (10 s) is ample. QUICK bounds the steps that wait for a timeout.
PATIENT, QUICK = "60", "15"
GENEROUS_DOWNTIME_MS = "5000"  # nested emulation: the paused round takes 0.2-1 s
PC = 32


def _kernel_refuses_tag_writes_while_logging() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 12)


def _loopback_up() -> None:
    """The lane's VM boots with ``lo`` down; TLS needs tcp on 127.0.0.1."""
    request = struct.Struct("16sh22x")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = request.unpack(fcntl.ioctl(sock, 0x8913, request.pack(b"lo", 0)))[1]
        fcntl.ioctl(sock, 0x8914, request.pack(b"lo", flags | 1))  # SIOCSIFFLAGS: IFF_UP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Request:
    """``guestmem vmm COMMAND --control PATH ...`` running; its progress lines as they come."""

    def __init__(self, command: str, control: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "guestmem", "vmm", command, "--control", str(control), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.phases: list[str] = []
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_progress, daemon=True)
        self._reader.start()

    def _read_progress(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").strip()
            with self._changed:
                self.lines.append(line)
                if line.startswith("{"):
                    self.phases.append(json.loads(line).get("phase", ""))
                self._changed.notify_all()

    def wait_for_phase(self, phase: str) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        with self._changed:
            while phase not in self.phases:
                assert self.process.poll() is None, f"ended before {phase}: {self.lines}"
                assert time.monotonic() < deadline, f"no {phase} phase: {self.lines}"
                self._changed.wait(0.5)

    def finish(self) -> tuple[int, str, str]:
        """Exit status, stdout, and the last stderr line."""
        assert self.process.stdout is not None
        out = self.process.stdout.read()  # stderr is the reader thread's alone
        self.process.wait(timeout=BOOT_TIMEOUT)
        self._reader.join(timeout=30)
        return self.process.returncode, out.decode(), self.lines[-1] if self.lines else ""


def _ask(command: str, control: Path, *args: str) -> tuple[int, str, str]:
    return Request(command, control, *args).finish()


class GoAheadThief:
    """A relay from ``listen`` to ``target`` that loses everything the source sends after READY."""

    def __init__(self, listen: Path, target: Path) -> None:
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(listen))
        self._server.listen(1)
        self._target = target
        self._ready = threading.Event()
        self.swallowed = b""
        self.carried = {"to target": 0, "to source": 0}  # what it did, for a failure
        self.errors: list[str] = []
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        source, _ = self._server.accept()
        target = socket.socket(socket.AF_UNIX)
        target.connect(str(self._target))
        self._sockets += [source, target]
        threading.Thread(target=self._carry, args=(target, source, True), daemon=True).start()
        self._carry(source, target, False)

    def _carry(self, a: socket.socket, b: socket.socket, from_target: bool) -> None:
        with_ready = False
        try:
            while data := a.recv(1 << 16):
                if from_target and data.startswith(b"RD"):
                    with_ready = True
                if not from_target and self._ready.is_set():
                    self.swallowed += data
                    continue
                b.sendall(data)
                self.carried["to source" if from_target else "to target"] += len(data)
                if with_ready:
                    self._ready.set()
        except OSError as err:
            self.errors.append(repr(err))

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


def _runs_on(vmm: Vmm) -> None:
    """The guest in ``vmm`` ticks again, with nothing lost so far."""
    tick = vmm.after(TICK, len(vmm.console.text))
    assert (tick[3], tick[4], tick[5]) == (b"0", b"0", b"SEGV_MTESERR"), tick[0]


def _paused_ms(line: str) -> int:
    match = re.search(r"paused (\d+) ms", line)
    return int(match[1]) if match else 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def vmms() -> Iterator[list[Vmm]]:
    started: list[Vmm] = []
    yield started
    for index, vmm in enumerate(started):  # shown only if the test failed
        args = " ".join(map(str, vmm.process.args[4:]))  # type: ignore[index]
        print(f"VMM {index} {args}: {vmm.errors.text.decode(errors='replace')}")
    for vmm in started:
        if vmm.process.poll() is None:
            os.kill(vmm.process.pid, signal.SIGCONT)
        vmm.kill()


def test_every_way_a_migration_fails_leaves_exactly_one_guest_running(
    tmp_path: Path, certs: Certificates, vmms: list[Vmm]
) -> None:
    _loopback_up()
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 << 20))
    control, gdb = tmp_path / "control", tmp_path / "gdb"
    kernel, initrd = _guest("GUESTMEM_GUEST_KERNEL"), _guest("GUESTMEM_GUEST_INITRD")
    boot = ["--kernel", kernel, "--initrd", initrd, "--append", APPEND, "--tags", "kvm"]
    source = Vmm(*boot, "--disk", str(disk), "--control", str(control), "--gdb", f"unix:{gdb}")
    vmms.append(source)
    source.after(TICK, source.after(READY, 0).end())
    _wait_for_socket(control, source)

    def target(*args: str) -> Vmm:
        vmm = Vmm("--tags", "kvm", "--disk", str(disk), "--migration-timeout", PATIENT, *args)
        vmms.append(vmm)
        return vmm

    def migrate(to: str, *args: str) -> Request:
        return Request("migrate", control, "--to", to, "--timeout", PATIENT,
                       "--max-downtime", GENEROUS_DOWNTIME_MS, *args)  # fmt: skip

    # 1. A second VMM on the same disk image is refused, naming the image.
    second = target("--kernel", kernel, "--initrd", initrd)
    assert second.finish() == 1
    assert b"disk.img is in use" in second.errors.text, second.errors.text

    # 6. The go-ahead is lost: both hold the guest, paused; the operator runs the source.
    incoming, relay_path, held = tmp_path / "in6", tmp_path / "relay6", tmp_path / "control6"
    patient = target("--incoming", f"unix:{incoming}", "--control", str(held),
                     "--migration-timeout", QUICK)  # fmt: skip
    _wait_for_socket(incoming, patient)
    thief = GoAheadThief(relay_path, incoming)
    try:
        attempt = migrate(f"unix:{relay_path}", "--timeout", QUICK)
        status, _, said = attempt.finish()
        assert status == 3 and "outcome unknown" in said, (
            attempt.lines,
            thief.carried,
            thief.errors,
        )
        assert thief.swallowed[:2] == b"GO", thief.swallowed
        _wait_for_text(patient, b"outcome unknown")
        for side in (control, held):
            code, out, _ = _ask("status", side)
            assert code == 0 and json.loads(out)["state"] == "held", out
        assert _ask("resume", control)[0] == 0
        assert _ask("quit", held)[0] == 0
        assert patient.finish() == 0
        assert b"GUEST" not in patient.console.text  # the target never ran the guest
    finally:
        thief.close()
    _runs_on(source)

    # 2. The target dies during pre-copy: the source never paused, and runs on.
    incoming = tmp_path / "in2"
    doomed = target("--incoming", f"unix:{incoming}")
    _wait_for_socket(incoming, doomed)
    attempt = migrate(f"unix:{incoming}")
    _wait_for_status(control, "busy")
    time.sleep(1)  # inside round 0: every page of 256 MiB, seconds under nested emulation
    assert not attempt.phases, attempt.lines
    doomed.process.kill()
    status, _, said = attempt.finish()
    assert status == 1 and "runs on here" in said, said
    assert _paused_ms(said) == 0
    _runs_on(source)

    # 3. The target stops once the guest is paused: the source resumes within its timeout.
    incoming = tmp_path / "in3"
    stalled = target("--incoming", f"unix:{incoming}")
    _wait_for_socket(incoming, stalled)
    attempt = migrate(f"unix:{incoming}", "--timeout", QUICK)
    attempt.wait_for_phase("paused")
    os.kill(stalled.process.pid, signal.SIGSTOP)
    status, _, said = attempt.finish()
    assert status == 1 and "runs on here" in said, said
    paused = _paused_ms(said)
    assert 0 < paused < (float(QUICK) + 5) * 1000, said  # the timeout, and nested slack
    FIGURES["vmm migration faults: target stopped in the final round: paused ms"] = paused
    stalled.process.kill()
    _runs_on(source)

    # 3b. The target is killed once the guest is paused: the source resumes at once.
    incoming = tmp_path / "in3b"
    killed = target("--incoming", f"unix:{incoming}")
    _wait_for_socket(incoming, killed)
    attempt = migrate(f"unix:{incoming}", "--timeout", PATIENT)
    attempt.wait_for_phase("paused")
    os.kill(killed.process.pid, signal.SIGSTOP)  # it cannot answer READY before it dies
    killed.process.kill()
    status, _, said = attempt.finish()
    assert status == 1 and "runs on here" in said, said
    paused = _paused_ms(said)
    assert 0 < paused < float(PATIENT) * 1000, said  # the closed socket, not the timeout
    FIGURES["vmm migration faults: target killed in the final round: paused ms"] = paused
    _runs_on(source)

    # 4. A target that trusts another CA refuses the source's certificate.
    port = _free_port()
    wary = target("--incoming", f"tcp:127.0.0.1:{port}", "--tls-cert", str(certs.server.cert),
                  "--tls-key", str(certs.server.key), "--tls-ca", str(certs.other_ca))  # fmt: skip
    _wait_for_listener(wary)
    tls = ["--tls-cert", str(certs.client.cert), "--tls-key", str(certs.client.key),
           "--tls-ca", str(certs.ca)]  # fmt: skip
    status, _, said = migrate(f"tcp:127.0.0.1:{port}", *tls).finish()
    assert status == 1 and "cannot reach the target" in said, said
    assert b"refused a connection" in wary.errors.text, wary.errors.text
    wary.kill()
    _runs_on(source)

    # 5. A debugger's tag write while KVM logs dirty pages.
    incoming = tmp_path / "in5"
    frozen = target("--incoming", f"unix:{incoming}")
    _wait_for_socket(incoming, frozen)
    os.kill(frozen.process.pid, signal.SIGSTOP)  # pre-copy fills the socket, then waits
    client = UnixClient(str(gdb))
    assert client.ask(b"?")[:1] == b"T"  # attached: the guest is stopped
    client.ask(b"Hg1")
    pc = int.from_bytes(bytes.fromhex(client.ask(b"g").decode())[8 * PC : 8 * PC + 8], "little")
    granule = pc & ~0xF
    tags = client.ask(b"qMemTags:%x,10:1" % granule)
    assert tags[:1] == b"m", tags
    attempt = migrate(f"unix:{incoming}")
    _wait_for_status(control, "busy")
    answers = set()
    for _ in range(20):  # until logging is on: the write changes nothing either way
        answers.add(client.ask(b"QMemTags:%x,10:1:%s" % (granule, tags[1:])))
        if b"E10" in answers:
            break
        time.sleep(0.5)
    if _kernel_refuses_tag_writes_while_logging():
        assert answers == {b"OK", b"E10"} or answers == {b"E10"}, answers
    else:
        assert answers == {b"OK"}, answers
    assert client.ask(b"qMemTags:%x,10:1" % granule) == tags  # nothing lost or half-written
    frozen.process.kill()
    status, _, said = attempt.finish()
    assert status == 1, said
    assert client.ask(b"QMemTags:%x,10:1:%s" % (granule, tags[1:])) == b"OK"  # logging is off
    assert client.ask(b"D") == b"OK"
    client.close()
    _runs_on(source)

    # 7. Over TLS with mutual authentication, the guest moves with its disk lock.
    port = _free_port()
    final = target("--incoming", f"tcp:127.0.0.1:{port}", "--tls-cert", str(certs.server.cert),
                   "--tls-key", str(certs.server.key), "--tls-ca", str(certs.ca))  # fmt: skip
    _wait_for_listener(final)
    status, out, said = migrate(f"tcp:127.0.0.1:{port}", *tls).finish()
    assert status == 0, said
    assert source.finish() == 0, source.errors.text
    late = target("--kernel", kernel, "--initrd", initrd)
    assert late.finish() == 1 and b"disk.img is in use" in late.errors.text
    _check_resumed(final, 0)
    record_migration(json.loads(out), "kvm to kvm over TLS")


def _wait_for_status(control: Path, state: str) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        code, out, _ = _ask("status", control)
        if code == 0 and json.loads(out)["state"] == state:
            return
        time.sleep(0.2)
    pytest.fail(f"the VMM never said {state}")


def _wait_for_text(vmm: Vmm, text: bytes) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while text not in vmm.errors.text:
        assert time.monotonic() < deadline, vmm.errors.text
        time.sleep(0.2)


def _wait_for_listener(vmm: Vmm) -> None:
    _wait_for_text(vmm, b"waiting for a migration")
