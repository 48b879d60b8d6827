"""``guestmem vmm run``: the reference VMM from the command line.

The guest's console is this process's stdout (each byte as the guest
writes it) and stdin (on a terminal, in raw mode; Ctrl-A x quits).
``--gdb HOST:PORT`` serves the running guest to GDB (guestmem.vmm.debug). Exit
status 0 when the guest powers off (or resets: the VMM does not reboot),
1 with one line on stderr for anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import guestmem as gm
from guestmem.tools.migrate import endpoint, memory_size, positive_int

if TYPE_CHECKING:  # the VMM (and libfdt) load only when a machine is built
    from guestmem.vmm.machine import Machine

_QUIT_PREFIX, _QUIT_KEY = b"\x01", b"x"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``vmm run`` to a CLI's subcommands."""
    vmm = commands.add_parser("vmm", help="the reference VMM: boot a guest with MTE on KVM")
    actions = vmm.add_subparsers(dest="vmm_command", required=True)
    run = actions.add_parser("run", help="boot a Linux kernel; its console on stdin and stdout")
    run.add_argument("--kernel", required=True, type=Path, help="arm64 Linux Image (or Image.gz)")
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
    run.set_defaults(run=_cmd_run)


def _disk(text: str) -> tuple[str, bool]:
    """``PATH`` or ``PATH,ro``."""
    path, _, option = text.partition(",")
    if not path or option not in ("", "ro"):
        raise argparse.ArgumentTypeError(f"not PATH or PATH,ro: {text!r}")
    return path, option == "ro"


def _cmd_run(args: argparse.Namespace) -> int:
    from guestmem.vmm.machine import Disk, Machine, MachineConfig

    config = MachineConfig(
        kernel=args.kernel.read_bytes(),
        command_line=args.append,
        initrd=args.initrd.read_bytes() if args.initrd else None,
        memory=args.memory,
        cpus=args.cpus,
        tags=gm.TagMode[args.tags.upper()],
        disks=tuple(Disk(path, read_only) for path, read_only in args.disk),
        virtio_console=args.virtio_console,
    )
    with (
        Machine(config, _write_stdout) as machine,
        _debugger(machine, args.gdb),
        _console_input(machine),
    ):
        outcome = machine.run()
    if outcome.reason == "reset":
        print("guestmem vmm: the guest reset; the VMM does not reboot it", file=sys.stderr)
    if outcome.reason in ("power-off", "reset", "quit"):
        return 0
    raise gm.GuestMemoryError(f"vmm: the run ended: {outcome.reason} {outcome.detail}".strip())


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
    thread = threading.Thread(target=server.serve, name="gdb", daemon=True)
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
