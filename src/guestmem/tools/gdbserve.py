"""``guestmem gdbserve``: serve a guest's memory and tags to GDB.

The guest is a demo image, or one restored from a migration stream.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

import guestmem as gm
from guestmem.gdbstub.server import GdbStub
from guestmem.migration import inspect, restore
from guestmem.tools.demo import demo_memory


def _memory(args: argparse.Namespace) -> gm.GuestMemory:
    if args.restore is None:
        return demo_memory(args.size_mib, args.tags)
    with open(args.restore, "rb") as f:
        header, _ = inspect(f)
        f.seek(0)
        mem = gm.GuestMemory.from_layout(header.regions, tags=args.tags)
        try:
            restore(f, mem)
        except BaseException:
            mem.close()
            raise
    return mem


def _cmd_gdbserve(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        mem = stack.enter_context(_memory(args))
        stub = stack.enter_context(
            GdbStub(mem, host=args.host, port=args.port, unix_path=args.unix)
        )
        regions = ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in mem.regions)
        print(
            f"guestmem gdbserve: listening on {stub.address} "
            f"({mem.tag_mode.name} tags; guest memory {regions})",
            flush=True,
        )
        try:
            stub.serve(sessions=1 if args.once else None)
        except KeyboardInterrupt:
            print("guestmem gdbserve: stopped", file=sys.stderr)
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gdbserve`` to a CLI's subcommands."""
    serve = commands.add_parser("gdbserve", help="serve guest memory and its tags to GDB")
    serve.add_argument("--restore", metavar="STREAM", help="a migration stream to serve")
    serve.add_argument("--size-mib", type=int, default=1, help="size of the demo guest")
    serve.add_argument("--tags", default="auto", help="tag mode: auto, hardware, software, none")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (other than loopback only if named)"
    )
    serve.add_argument("--port", type=int, default=1234, help="TCP port (0: any free port)")
    serve.add_argument("--unix", metavar="PATH", help="listen on a Unix socket instead")
    serve.add_argument("--once", action="store_true", help="serve one session, then exit")
    serve.set_defaults(run=_cmd_gdbserve)
