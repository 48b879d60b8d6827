"""Live migration and snapshots of a running MTE guest between two VMM processes.

The nested guest boots with ``probe.mode=migrate``: its /init runs
tests/guest/mig_probe.c, which keeps writing and re-tagging a PROT_MTE
buffer (data and tags together, and tags alone) while it verifies every
chunk it revisits, and checks every two seconds that a wrong tag still
faults. The source VMM (``guestmem vmm run --control``) is migrated with
``guestmem vmm migrate`` to a target VMM started with ``--incoming``; the
probe's console lines then come from the target, and its final check of
the whole buffer must find every byte and tag as it wrote them. A snapshot
(``guestmem vmm snapshot``) resumed with ``--restore`` must do the same.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import FIGURES, LANE
from test_vmm_boot import APPEND, BOOT_TIMEOUT, Console

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        LANE != "arm64-kernel",
        reason="needs /dev/kvm with MTE and a guest kernel: the arm64-kernel lane runs these",
    ),
]

MEMORY, CPUS, MIB = "256M", "2", 16  # 128M: 6.12 runs out of memory while booting
PROBE_APPEND = f"{APPEND} probe.mode=migrate mig.mib={MIB}"
READY = re.compile(rb"MIG-PROBE-READY mib=\d+\r?\n")
TICK = re.compile(
    rb"MIG-PROBE tick=(\d+) passes=(\d+) bad_data=(\d+) bad_tags=(\d+) fault=(\S+) "
    rb"maxgap_ms=(\d+)\r?\n"
)
DONE = re.compile(rb"MIG-PROBE-DONE passes=(\d+) bad_data=(\d+) bad_tags=(\d+) fault=(\S+)\r?\n")
EXIT = re.compile(rb"GUEST-MIG-EXIT (\d+)\r?\n")


class Vmm:
    """A ``guestmem vmm run`` process; its stdout is the guest's console."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "guestmem", "vmm", "run", "--memory", MEMORY]
        self.process = subprocess.Popen(
            [*command, "--cpus", CPUS, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.console = Console()
        self.errors = Console()
        for stream, sink in (
            (self.process.stdout, self.console),
            (self.process.stderr, self.errors),
        ):
            threading.Thread(target=_pump, args=(stream, sink), daemon=True).start()

    def after(self, pattern: re.Pattern[bytes], start: int) -> re.Match[bytes]:
        """The first line matching ``pattern`` that began after console byte ``start``."""
        rest = re.compile(pattern.pattern)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            match = rest.search(self.console.text, start)
            if match is not None:
                return match
            if self.process.poll() is not None:
                time.sleep(0.5)  # the last output may still be in the pipe
                if (match := rest.search(self.console.text, start)) is not None:
                    return match
                break
            time.sleep(0.2)
        pytest.fail(f"no {pattern.pattern!r} after byte {start}:\n{self.console.text!r}\n"
                    f"{self.errors.text!r}")  # fmt: skip

    def type(self, line: bytes) -> None:
        """Type a line at the guest's console."""
        assert self.process.stdin is not None
        self.process.stdin.write(line)
        self.process.stdin.flush()

    def finish(self) -> int:
        """Wait for the VMM to exit; its status."""
        try:
            return self.process.wait(timeout=BOOT_TIMEOUT)
        finally:
            self.kill()

    def kill(self) -> None:
        """Make sure the process is gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _pump(stream: object, sink: Console) -> None:
    while data := os.read(stream.fileno(), 4096):  # type: ignore[attr-defined]
        sink.write(data)


def _guest(variable: str) -> str:
    path = os.environ.get(variable, "")
    if not os.path.exists(path):
        pytest.fail(f"{variable} names no file: the arm64-kernel lane puts the nested guest there")
    return path


def _source(tags: str, control: Path) -> Vmm:
    kernel, initrd = _guest("GUESTMEM_GUEST_KERNEL"), _guest("GUESTMEM_GUEST_INITRD")
    return Vmm("--kernel", kernel, "--initrd", initrd, "--append", PROBE_APPEND, "--tags", tags,
               "--control", str(control))  # fmt: skip


MAX_DOWNTIME_MS = "5000"  # nested emulation sends the last round in 0.2-1 s (benchmarks.md)
PATIENCE = "60"  # seconds on a quiet peer: nested emulation starves a busy VMM for seconds


def _request(command: str, control: Path, to: str) -> dict[str, object]:
    limits = (
        ["--max-downtime", MAX_DOWNTIME_MS, "--timeout", PATIENCE] if command == "migrate" else []
    )
    guestmem = [sys.executable, "-m", "guestmem", "vmm"]
    done = subprocess.run(
        [*guestmem, command, "--control", str(control), "--to", to, *limits],
        capture_output=True,
        timeout=BOOT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    report: dict[str, object] = json.loads(done.stdout)
    return report


def _wait_for_socket(path: Path, vmm: Vmm) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not path.exists():
        assert vmm.process.poll() is None, vmm.errors.text
        assert time.monotonic() < deadline, "the target never listened"
        time.sleep(0.1)


def _check_resumed(vmm: Vmm, start: int) -> None:
    """The guest runs on in ``vmm`` after console byte ``start``, and ends with nothing lost."""
    tick = vmm.after(TICK, start)
    assert tick[3] == b"0" and tick[4] == b"0", tick[0]
    assert tick[5] == b"SEGV_MTESERR", tick[0]
    vmm.type(b"go\n")
    done = vmm.after(DONE, tick.end())
    assert (done[2], done[3], done[4]) == (b"0", b"0", b"SEGV_MTESERR"), done[0]
    assert vmm.after(EXIT, done.end())[1] == b"0"
    assert vmm.finish() == 0, vmm.errors.text


# KVM to KVM is the last step of test_vmm_migration_faults.py (over TLS, after
# every failure): one boot less per kernel lane.
@pytest.mark.parametrize(
    ("source_tags", "target_tags"),
    [("hardware", "hardware"), ("hardware", "kvm")],
    ids=["HARDWARE", "HARDWARE-to-KVM"],
)
def test_live_migration_of_a_running_mte_guest(
    source_tags: str, target_tags: str, tmp_path: Path
) -> None:
    control, incoming = tmp_path / "control", tmp_path / "incoming"
    source = _source(source_tags, control)
    target = Vmm(
        "--incoming", f"unix:{incoming}", "--tags", target_tags, "--migration-timeout", PATIENCE
    )
    try:
        source.after(TICK, source.after(READY, 0).end())
        _wait_for_socket(incoming, target)
        _wait_for_socket(control, source)
        report = _request("migrate", control, f"unix:{incoming}")
        assert source.finish() == 0, source.errors.text
        assert b"the guest migrated" in source.errors.text
        _check_resumed(target, 0)
    finally:
        source.kill()
        target.kill()
    record_migration(report, f"{source_tags} to {target_tags}")


def record_migration(report: dict[str, object], label: str) -> None:
    """Check a live migration went as designed (rounds, KVM's dirty log) and keep its figures."""
    rounds = report["rounds"]
    assert isinstance(rounds, list) and len(rounds) >= 2, report
    assert int(report["dirty_pages_from_kvm"]) > 0, "the guest's writes came from KVM's log"  # type: ignore[call-overload]
    FIGURES[f"vmm live migration {label}: downtime ms"] = round(float(report["downtime"]) * 1000)  # type: ignore[arg-type]
    FIGURES[f"vmm live migration {label}: total ms"] = round(float(report["total"]) * 1000)  # type: ignore[arg-type]
    FIGURES[f"vmm live migration {label}: rounds"] = len(rounds)
    FIGURES[f"vmm live migration {label}: pages"] = int(report["pages"])  # type: ignore[call-overload]
    FIGURES[f"vmm live migration {label}: tag bytes"] = int(report["tag_bytes"])  # type: ignore[call-overload]


def test_snapshot_round_trip_resumes_the_same_guest(tmp_path: Path) -> None:
    control, image = tmp_path / "control", tmp_path / "guest.snapshot"
    source = _source("kvm", control)
    try:
        source.after(TICK, source.after(READY, 0).end())
        _wait_for_socket(control, source)
        report = _request("snapshot", control, str(image))
        _check_resumed(source, len(source.console.text))  # the source runs on after a snapshot
    finally:
        source.kill()
    restored = Vmm("--restore", str(image), "--tags", "kvm")
    try:
        _check_resumed(restored, 0)
    finally:
        restored.kill()
    FIGURES["vmm snapshot (KVM tags): pause ms"] = round(float(report["downtime"]) * 1000)  # type: ignore[arg-type]
    FIGURES["vmm snapshot (KVM tags): bytes"] = int(report["bytes"])  # type: ignore[call-overload]
