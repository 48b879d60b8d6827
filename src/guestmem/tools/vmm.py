"""``guestmem vmm run``: the reference VMM from the command line, and its control client.

The guest's console is this process's stdout (each byte as the guest
writes it) and stdin (on a terminal, in raw mode; Ctrl-A x quits).
``--gdb HOST:PORT`` serves the running guest to GDB (guestmem.gdbstub.GuestDebugServer).
``--control PATH`` serves the control socket (guestmem.vmm.control) that
``vmm snapshot``, ``migrate``, ``cancel``, ``resume``, ``quit`` and
``status`` talk to; ``--restore FILE`` resumes a snapshot and
``--incoming ENDPOINT`` waits for a live migration, instead of ``--kernel``
(guestmem.vmm.transfer, guestmem.vmm.handover). ``vmm run`` exits 0 when
the guest powers off (or resets: the VMM does not reboot), migrated away,
or was quit; 1 with one line on stderr for anything else. The control
commands exit 0 on success, 1 on a failure (the guest runs on where it
was) and 3 when a migration's outcome is unknown (the guest is held
paused: decide with ``vmm resume`` on one side and ``vmm quit`` on the
other).
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
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import guestmem as gm
from guestmem.migration import channel
from guestmem.tools.migrate import endpoint_arg, memory_size, positive_int
from guestmem.vmm.outcome import EndReason, Outcome

if TYPE_CHECKING:  # the VMM (and libfdt) load only when a machine is built
    from guestmem.vmm.control import ControlServer
    from guestmem.vmm.machine import Machine

CLIENT_TIMEOUT = 300.0  # seconds a control client waits for the VMM's next line
HELD = 3  # exit status: a migration's outcome is unknown, the guest held paused

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
        type=endpoint_arg,
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
        type=endpoint_arg,
        help="wait for a live migration here instead of booting a kernel",
    )
    run.add_argument(
        "--migration-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="with --incoming: how long the source may stay quiet (default %(default)s)",
    )
    _add_channel_flags(run)
    start.add_argument(
        "--restore", metavar="FILE", type=Path, help="resume a snapshot instead of booting"
    )
    run.set_defaults(run=_cmd_run)
    requests = {
        "migrate": "migrate the guest of a running VMM live",
        "snapshot": "save the guest of a running VMM to a file; it runs on",
        "cancel": "end a migration in progress before its go-ahead; the guest runs on",
        "resume": "after an unknown migration outcome: run the held guest here",
        "quit": "end a VMM (after an unknown migration outcome: give the guest up there)",
        "status": "what a VMM is doing: running, busy (with what) or held (why)",
    }
    for name, what in requests.items():
        action = actions.add_parser(
            name, help=what, aliases=["migrate-cancel"] if name == "cancel" else []
        )
        action.add_argument("--control", required=True, metavar="PATH", help="the VMM's socket")
        action.set_defaults(run=_cmd_request, request=name)
        if name == "snapshot":
            action.add_argument("--to", required=True, type=Path, help="the snapshot file")
        if name == "migrate":
            action.add_argument(
                "--to", required=True, type=endpoint_arg, help="the target's --incoming"
            )
            action.add_argument(
                "--max-rounds",
                type=_rounds,
                default=8,
                help="pre-copy rounds after the first (0-64, default 8)",
            )
            action.add_argument(
                "--max-downtime",
                type=positive_int,
                default=300,
                metavar="MS",
                help="pre-copy goes on until the paused round would fit in this (default 300)",
            )
            action.add_argument(
                "--timeout",
                type=_seconds,
                default=10.0,
                metavar="SECONDS",
                help="give up (the guest runs on) when the target stalls this long (default 10)",
            )
            action.add_argument(
                "--auto-converge",
                action="store_true",
                help="slow the guest's vCPUs while rounds do not converge, as QEMU does",
            )
            _add_channel_flags(action)


def _disk(text: str) -> tuple[str, bool]:
    """``PATH`` or ``PATH,ro``."""
    path, _, option = text.partition(",")
    if not path or option not in ("", "ro"):
        raise argparse.ArgumentTypeError(f"not PATH or PATH,ro: {text!r}")
    return path, option == "ro"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 600:
        raise argparse.ArgumentTypeError(f"not a number of seconds from 0.1 to 600: {text!r}")
    return value


def _rounds(text: str) -> int:
    if not text.isdigit() or int(text) > 64:
        raise argparse.ArgumentTypeError(f"not a whole number from 0 to 64: {text!r}")
    return int(text)


def _add_channel_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="this side's certificate (tcp: only; with --tls-key and --tls-ca)",
    )
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        metavar="PEM",
        help="the CA the other side's certificate must chain to",
    )
    parser.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow plain tcp: beyond loopback (anyone on the path reads guest RAM)",
    )


def _tls(args: argparse.Namespace) -> channel.TlsConfig | None:
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if not any(files):
        return None
    if not all(files):
        raise gm.UsageError("--tls-cert, --tls-key and --tls-ca go together")
    cert, key, ca = (str(f.resolve()) for f in files)
    return channel.TlsConfig(cert, key, ca)


def _cmd_run(args: argparse.Namespace) -> int:
    tls = _tls(args)  # its files are checked now, before any machine
    if tls is not None and (args.incoming is None or args.incoming.family != "tcp"):
        raise gm.UsageError("--tls-cert, --tls-key and --tls-ca go with --incoming tcp:")
    with contextlib.ExitStack() as stack:
        snapshot = None
        if args.restore is not None:  # before the machine: a typo is not a KVM error
            snapshot = stack.enter_context(open(args.restore, "rb"))
        return _run_machine(args, stack, snapshot, tls)
    raise AssertionError("unreachable")  # pragma: no cover


def _run_machine(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    snapshot: BinaryIO | None,
    tls: channel.TlsConfig | None,
) -> int:
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
    incoming = args.incoming is not None
    machine = stack.enter_context(Machine(config, _write_stdout, lock_disks=not incoming))
    control = stack.enter_context(_control(machine, args.control))
    listener = None
    if incoming:  # listening only once the machine can take a migration at once
        listener = channel.listen(args.incoming, tls=tls, allow_insecure=args.allow_insecure)
        stack.callback(listener.close)
    if snapshot is not None:
        from guestmem.vmm import transfer

        transfer.receive(machine, snapshot)
    if listener is not None and not _take_over(machine, listener, control, args.migration_timeout):
        return 0  # quit while waiting
    with _debugger(machine, args.gdb), _console_input(machine):
        outcome = machine.run()
    return _exit_status(outcome)


def _exit_status(outcome: Outcome) -> int:
    """0 when the run ended as the guest or the operator meant; else raise, saying how."""
    if outcome.reason is EndReason.MIGRATED:
        print("guestmem vmm: the guest migrated; this VMM is done", file=sys.stderr)
        return 0
    if outcome.reason is EndReason.RESET:
        print("guestmem vmm: the guest reset; the VMM does not reboot it", file=sys.stderr)
    if outcome.reason in (EndReason.POWER_OFF, EndReason.RESET, EndReason.QUIT):
        return 0
    raise gm.GuestMemoryError(f"vmm: the run ended: {outcome.reason} {outcome.detail}".strip())


def _take_over(
    machine: Machine,
    listener: channel.Listener,
    control: ControlServer | None,
    timeout: float,
) -> bool:
    """Wait for a live migration and take the guest over; False if told to quit meanwhile."""
    from guestmem.vmm import handover, transfer

    quitting = threading.Event()

    def quit_waiting() -> bool:
        quitting.set()
        listener.close()
        return True

    say = _stderr
    say(f"waiting for a migration on {listener.endpoint}")
    try:
        with (
            control.occupied("an incoming migration", quit_waiting)
            if control
            else contextlib.nullcontext()
        ):
            while True:
                try:
                    client = listener.accept()
                except (OSError, gm.GuestMemoryError) as err:
                    if quitting.is_set():
                        return False
                    if isinstance(err, channel.HandshakeError):
                        say(f"refused a connection: {err}")
                        continue
                    raise
                with client:
                    report = transfer.take_over(machine, client, timeout=timeout)
                break
    except handover.OutcomeUnknown as err:
        if control is None:
            never = (
                "without --control this VMM cannot wait for a decision: the guest never ran here"
            )
            raise gm.GuestMemoryError(f"{err}; {never}") from None
        control.hold(err.hold)
        decide = f"guestmem vmm resume (or quit) --control {control.path}"
        say(f"{err}: the guest waits here; decide with {decide}")
        if err.hold.wait() != "resume":
            return False
        say("resumed by the operator")
        return True
    say(f"migrated in: {report.pages} pages")
    return True


def _stderr(message: str) -> None:
    print(f"guestmem vmm: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _control(machine: Machine, path: str | None) -> Iterator[ControlServer | None]:
    """Serve the control socket from a thread while the block runs."""
    if path is None:
        yield None
        return
    from guestmem.vmm.control import ControlServer

    server = ControlServer(machine, path)
    with _serving(server, "control"):
        yield server


def _cmd_request(args: argparse.Namespace) -> int:
    """Send one request to a VMM's control socket; progress on stderr, the report on stdout."""
    command = args.request
    request: dict[str, Any] = {"command": command}
    if command == "snapshot":
        request["to"] = str(args.to.resolve())  # the VMM runs elsewhere: it gets no relative path
    if command == "migrate":
        where = args.to.resolved()
        request.update(to=str(where), max_rounds=args.max_rounds,
                       max_downtime_ms=args.max_downtime, timeout=args.timeout)  # fmt: skip
        tls = _tls(args)
        if tls is not None:
            request["tls"] = {"cert": tls.cert, "key": tls.key, "ca": tls.ca}
        if args.allow_insecure:
            request["allow_insecure"] = True
        if args.auto_converge:
            request["auto_converge"] = True
    answer = _exchange(args.control, request, command)
    if answer.get("ok") is True and isinstance(answer.get("report"), dict):
        print(json.dumps(answer["report"]))
        return 0
    kind, error = answer.get("kind"), answer.get("error")
    if not isinstance(error, str):
        raise gm.GuestMemoryError(
            f"{args.control}: an answer this client does not know: {answer!r:.200}"
        )
    paused = answer.get("paused_ms")
    if isinstance(paused, int) and paused:
        error += f" (the guest was paused {paused} ms)"
    _stderr(f"{command}: {error}")
    return HELD if kind == "held" else 1


def _exchange(path: str, request: dict[str, Any], command: str) -> dict[str, Any]:
    """Send ``request``; print progress lines to stderr; the final answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(CLIENT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as err:
            raise gm.GuestMemoryError(
                f"{path}: {err.strerror or err} (is a VMM serving --control there?)"
            ) from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            for line in sock.makefile("rb"):
                try:
                    answer = json.loads(line)
                except ValueError:
                    raise gm.GuestMemoryError(
                        f"{path}: the VMM answered something that is not JSON: {line[:200]!r}"
                    ) from None
                if not isinstance(answer, dict):
                    break
                if "progress" in answer:
                    print(json.dumps(answer["progress"]), file=sys.stderr, flush=True)
                    continue
                return answer
        except TimeoutError:
            raise gm.GuestMemoryError(
                f"{path}: no answer to {command} within {CLIENT_TIMEOUT:g} s"
            ) from None
        except OSError as err:
            raise gm.GuestMemoryError(f"{path}: {err.strerror or err}") from None
    raise gm.GuestMemoryError(f"{path}: the VMM hung up without answering {command}")


def _write_stdout(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


@contextlib.contextmanager
def _debugger(machine: Machine, where: channel.Endpoint | None) -> Iterator[None]:
    """Serve ``machine`` to GDB from a thread while the block runs; breakpoints out after."""
    if where is None:
        yield
        return
    from guestmem.gdbstub import GuestDebugServer
    from guestmem.vmm.run_control import KvmRunControl

    assert machine.memory is not None
    target = KvmRunControl(machine)
    if where.family == "unix":
        assert where.path is not None
        server = GuestDebugServer(machine.memory, target, unix_path=where.path)
    else:
        assert where.host is not None and where.port is not None
        server = GuestDebugServer(machine.memory, target, host=where.host, port=where.port)
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
                machine.stop(EndReason.QUIT)
                return
            escape = data.endswith(_QUIT_PREFIX)
        machine.console_input(data)
