"""``guestmem gdbserve``: serve a guest's memory and tags to GDB or LLDB.

The guest is a demo image, or one restored from a migration stream. Every
operator error (a stream that cannot be read, an address that cannot be
bound, a non-loopback address without ``--allow-remote``) is one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

import guestmem as gm
from guestmem.errors import GuestMemoryError
from guestmem.gdbstub.server import DEFAULT_IDLE_TIMEOUT, GdbStub
from guestmem.gdbstub.wire import is_loopback
from guestmem.migration import inspect, restore
from guestmem.tools.demo import DEMO_GPA, demo_memory
from guestmem.tools.migrate import DEFAULT_MAX_MEMORY, memory_size

REMOTE_WARNING = (
    "guestmem gdbserve: WARNING: listening on a non-loopback address. The GDB remote "
    "protocol has no authentication: anyone who can reach {where} can read and write "
    "guest memory and tags{writes}."
)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("a positive number of MiB")
    return value


def _seconds(text: str) -> float | None:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("a number of seconds, 0 for none")
    return value or None


def _memory(args: argparse.Namespace) -> gm.GuestMemory:
    if args.restore is None:
        return demo_memory(args.size_mib, args.tags)
    with open(args.restore, "rb") as f:
        header, _ = inspect(f, max_memory=memory_size(DEFAULT_MAX_MEMORY))  # before mapping
        f.seek(0)
        mem = gm.GuestMemory.from_layout(header.regions, tags=args.tags)
        try:
            restore(f, mem)
        except BaseException:
            mem.close()
            raise
    return mem


def _fail(message: str) -> int:
    print(f"guestmem gdbserve: {message}", file=sys.stderr)
    return 1


def _cmd_gdbserve(args: argparse.Namespace) -> int:
    where = args.unix if args.unix is not None else f"{args.host}:{args.port}"
    remote = args.unix is None and not is_loopback(args.host)
    if remote and not args.allow_remote:
        return _fail(
            f"{args.host!r} is not a loopback address; the protocol has no authentication "
            "and writes guest memory: add --allow-remote to bind it anyway"
        )
    with ExitStack() as stack:
        try:
            mem = stack.enter_context(_memory(args))
        except (OSError, GuestMemoryError) as error:
            return _fail(f"cannot serve {args.restore or 'the demo guest'}: {error}")
        try:
            stub = GdbStub(
                mem,
                host=args.host,
                port=args.port,
                unix_path=args.unix,
                allow_remote=args.allow_remote,
                read_only=args.read_only,
                idle_timeout=args.idle_timeout,
            )
        except OSError as error:
            return _fail(f"cannot listen on {where}: {error}")
        stack.enter_context(stub)
        if remote:
            writes = " (this one refuses writes: --read-only)" if args.read_only else ""
            print(REMOTE_WARNING.format(where=stub.address, writes=writes), file=sys.stderr)
        regions = ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in mem.regions)
        print(
            f"guestmem gdbserve: listening on {stub.address} "
            f"({mem.tag_mode.name} tags; guest memory {regions}"
            f"{'; read-only' if args.read_only else ''})",
            flush=True,
        )
        try:
            stub.serve(sessions=1 if args.once else None)
        except KeyboardInterrupt:
            print("guestmem gdbserve: stopped", file=sys.stderr)
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gdbserve`` to a CLI's subcommands."""
    serve = commands.add_parser("gdbserve", help="serve guest memory and its tags to GDB or LLDB")
    serve.add_argument(
        "--restore",
        metavar="STREAM",
        help=f"a migration stream to serve (default: a demo guest at {DEMO_GPA:#x})",
    )
    serve.add_argument("--size-mib", type=_positive, default=1, help="size of the demo guest")
    serve.add_argument(
        "--tags",
        default="auto",
        choices=("auto", "hardware", "software", "none"),
        help="tag mode (auto: hardware where the CPU has MTE, else software)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host that is not loopback: the protocol has no authentication "
        "and writes guest memory",
    )
    serve.add_argument("--port", type=int, default=1234, help="TCP port (0: any free port)")
    serve.add_argument("--unix", metavar="PATH", help="listen on a Unix socket instead")
    serve.add_argument(
        "--read-only",
        action="store_true",
        help="refuse every write to memory and tags (M, X, QMemTags: E0d)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help=f"end a session silent this long (default {DEFAULT_IDLE_TIMEOUT:.0f}; 0: never)",
    )
    serve.add_argument("--once", action="store_true", help="serve one session, then exit")
    serve.set_defaults(run=_cmd_gdbserve)
