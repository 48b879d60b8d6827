"""``guestmem vmm run``: the reference VMM from the command line.

The guest's console is this process's stdout (each byte as the guest
writes it) and stdin (on a terminal, in raw mode; Ctrl-A x quits).
``--gdb HOST:PORT`` serves the running guest to GDB (guestmem.vmm.debug).
``--control PATH`` serves the control socket that ``vmm snapshot`` and
``vmm migrate`` talk to; ``--restore FILE`` resumes a snapshot and
``--incoming ENDPOINT`` waits for a live migration, instead of ``--kernel``
(guestmem.vmm.transfer). A migrated source exits 0. Exit
status 0 when the guest powers off (or resets: the VMM does not reboot),
1 with one line on stderr for anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import guestmem as gm
from guestmem.tools.migrate import endpoint, listen, memory_size, positive_int

if TYPE_CHECKING:  # the VMM (and libfdt) load only when a machine is built
    from guestmem.vmm.machine import Machine

_QUIT_PREFIX, _QUIT_KEY = b"\x01", b"x"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``vmm run`` to a CLI's subcommands."""
    vmm = commands.add_parser("vmm", help="the reference VMM: boot a guest with MTE on KVM")
    actions = vmm.add_subparsers(dest="vmm_command", required=True)
    run = actions.add_parser("run", help="boot a Linux kernel; its console on stdin and stdout")
    start = run.add_mutually_exclusive_group(required=True)
    start.add_argument("--kernel", type=Path, help="arm64 Linux Image (or Image.gz)")
    run.add_argument("--initrd", type=Path, help="initial RAM disk")
    run.add_argument("--append", default="console=ttyAMA0", help="kernel command line")
    run.add_argument("--memory", type=memory_size, default="256M", help="guest RAM, e.g. 256M, 1G")
    run.add_argument("--cpus", type=positive_int, default=1, help="vCPUs (default 1)")
    run.add_argument(
        "--tags",
        choices=("hardware", "kvm"),
        default="hardware",
        help="hardware: the VMM maps guest RAM with PROT_MTE; kvm: untagged, tags via KVM",
    )
    run.add_argument(
        "--disk",
        metavar="PATH[,ro]",
        action="append",
        type=_disk,
        default=[],
        help="a disk image as virtio-blk (repeatable; ,ro: read-only)",
    )
    run.add_argument(
        "--virtio-console",
        action="store_true",
        help="add a virtio-console (the guest's hvc0), which then takes stdin",
    )
    run.add_argument(
        "--gdb",
        metavar="HOST:PORT",
        type=endpoint,
        help="serve the running guest to GDB (loopback, or unix:PATH): stop, step, "
        "breakpoints, registers, memory and tags by virtual address",
    )
    run.add_argument(
        "--control",
        metavar="PATH",
        help="serve a control socket here (guestmem vmm snapshot and migrate use it)",
    )
    start.add_argument(
        "--incoming",
        metavar="unix:PATH|tcp:HOST:PORT",
        type=endpoint,
        help="wait for a live migration here instead of booting a kernel",
    )
    start.add_argument(
        "--restore", metavar="FILE", type=Path, help="resume a snapshot instead of booting"
    )
    run.set_defaults(run=_cmd_run)
    for name, what, to_help in (
        ("migrate", "migrate the guest of a running VMM live", "the target's --incoming"),
        ("snapshot", "save the guest of a running VMM to a file; it runs on", "the file"),
    ):
        action = actions.add_parser(name, help=what)
        action.add_argument("--control", required=True, metavar="PATH", help="the VMM's socket")
        action.add_argument("--to", required=True, help=to_help)
        if name == "migrate":
            action.add_argument("--max-rounds", type=int, default=8, help="pre-copy rounds")
        action.set_defaults(run=_cmd_request)


def _disk(text: str) -> tuple[str, bool]:
    """``PATH`` or ``PATH,ro``."""
    path, _, option = text.partition(",")
    if not path or option not in ("", "ro"):
        raise argparse.ArgumentTypeError(f"not PATH or PATH,ro: {text!r}")
    return path, option == "ro"


def _cmd_run(args: argparse.Namespace) -> int:
    from guestmem.vmm.machine import Disk, Machine, MachineConfig

    config = MachineConfig(
        kernel=args.kernel.read_bytes() if args.kernel else None,
        command_line=args.append,
        initrd=args.initrd.read_bytes() if args.initrd else None,
        memory=args.memory,
        cpus=args.cpus,
        tags=gm.TagMode[args.tags.upper()],
        disks=tuple(Disk(path, read_only) for path, read_only in args.disk),
        virtio_console=args.virtio_console,
    )
    with Machine(config, _write_stdout) as machine:
        _load(machine, args)
        with _debugger(machine, args.gdb), _control(machine, args.control), _console_input(machine):
            outcome = machine.run()
    if outcome.reason == "migrated":
        print("guestmem vmm: the guest migrated; this VMM is done", file=sys.stderr)
        return 0
    if outcome.reason == "reset":
        print("guestmem vmm: the guest reset; the VMM does not reboot it", file=sys.stderr)
    if outcome.reason in ("power-off", "reset", "quit"):
        return 0
    raise gm.GuestMemoryError(f"vmm: the run ended: {outcome.reason} {outcome.detail}".strip())


def _load(machine: Machine, args: argparse.Namespace) -> None:
    """Resume a snapshot, or wait for and take a live migration, as asked."""
    from guestmem.vmm import transfer

    if args.restore is not None:
        with open(args.restore, "rb") as snapshot:
            transfer.receive(machine, snapshot, answer=False)
        return
    if args.incoming is None:
        return
    with listen(args.incoming) as server:
        where = server.getsockname()
        print(f"guestmem vmm: waiting for a migration on {where}", file=sys.stderr, flush=True)
        client, _ = server.accept()
        with client:
            report = transfer.receive(machine, client, answer=True)
    if args.incoming[0] == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(args.incoming[1]))
    print(f"guestmem vmm: migrated in: {report.pages} pages", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _control(machine: Machine, path: str | None) -> Iterator[None]:
    """Serve the control socket from a thread while the block runs."""
    if path is None:
        yield
        return
    from guestmem.vmm.control import ControlServer

    with _serving(ControlServer(machine, path), "control"):
        yield


def _cmd_request(args: argparse.Namespace) -> int:
    """Send one request to a VMM's control socket; progress on stderr, the report on stdout."""
    request: dict[str, object] = {"command": args.vmm_command, "to": args.to}
    if args.vmm_command == "migrate":
        request["max_rounds"] = args.max_rounds
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(args.control)
        sock.sendall(json.dumps(request).encode() + b"\n")
        for line in sock.makefile("rb"):
            answer = json.loads(line)
            if "progress" in answer:
                print(json.dumps(answer["progress"]), file=sys.stderr, flush=True)
                continue
            if not answer.get("ok"):
                raise gm.GuestMemoryError(f"vmm {args.vmm_command}: {answer.get('error')}")
            print(json.dumps(answer["report"]))
            return 0
    raise gm.GuestMemoryError(f"vmm {args.vmm_command}: the VMM hung up without an answer")


def _write_stdout(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


@contextlib.contextmanager
def _debugger(machine: Machine, where: tuple[str, object] | None) -> Iterator[None]:
    """Serve ``machine`` to GDB from a thread while the block runs; breakpoints out after."""
    if where is None:
        yield
        return
    from guestmem.vmm.debug import GuestDebugServer
    from guestmem.vmm.run_control import KvmRunControl

    assert machine.memory is not None
    family, address = where
    if family == "unix":
        assert isinstance(address, str)
        server = GuestDebugServer(machine.memory, KvmRunControl(machine), unix_path=address)
    else:
        assert isinstance(address, tuple)
        host, port = address
        server = GuestDebugServer(machine.memory, KvmRunControl(machine), host=host, port=port)
    print(f"guestmem vmm: GDB: target remote {server.address}", file=sys.stderr, flush=True)
    with _serving(server, "gdb"):
        yield


class _Server(Protocol):
    def serve(self) -> None: ...
    def close(self) -> None: ...


@contextlib.contextmanager
def _serving(server: _Server, name: str) -> Iterator[None]:
    """Run ``server.serve`` on a thread while the block runs; close and join it after."""
    thread = threading.Thread(target=server.serve, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.close()
        thread.join(timeout=30)


@contextlib.contextmanager
def _console_input(machine: Machine) -> Iterator[None]:
    """Feed stdin to the guest's UART from a thread; a terminal is raw meanwhile."""
    saved = None
    if os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    thread = threading.Thread(target=_pump_stdin, args=(machine,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _pump_stdin(machine: Machine) -> None:
    escape = False
    while True:
        try:
            data = os.read(0, 256)
        except OSError:
            return
        if not data:
            return
        if os.isatty(0):
            if _QUIT_PREFIX + _QUIT_KEY in (_QUIT_PREFIX if escape else b"") + data:
                machine.stop("quit")
                return
            escape = data.endswith(_QUIT_PREFIX)
        machine.console_input(data)
