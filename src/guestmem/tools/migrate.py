"""``guestmem migrate`` and ``guestmem inspect``: streams from the command line."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from collections.abc import Sequence

import numpy as np

import guestmem as gm
from guestmem.migration.live import Progress, receive, send_live
from guestmem.migration.save import inspect, restore, save
from guestmem.tools.demo import DEMO_GPA, demo_memory, digest
from guestmem.units import STREAM_PAGE


def progress_bar(total_pages: int) -> ProgressBar:
    """A one-line progress display on stderr."""
    return ProgressBar(total_pages)


class ProgressBar:
    """Draws ``Progress`` reports as a bar, round and dirty rate on stderr."""

    def __init__(self, total_pages: int) -> None:
        """Draw against ``total_pages`` (the guest's size in pages)."""
        self.total = max(total_pages, 1)

    def __call__(self, p: Progress) -> None:
        """Redraw for one report."""
        done = min(p.pages / self.total, 1.0)
        bar = "#" * int(done * 30)
        sys.stderr.write(
            f"\r[{bar:<30}] {p.phase:<8} round {p.round:>2}  {p.pages:>8} pages "
            f"{p.bytes / 2**20:>8.1f} MiB  dirty {p.dirty_pages:>6} ({p.dirty_rate:,.0f}/s)"
        )
        if p.phase == "done":
            sys.stderr.write("\n")
        sys.stderr.flush()


def _address(text: str) -> socket.socket:
    if text.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(text[5:])
        return sock
    host, _, port = text.rpartition(":")
    return socket.create_connection((host or "127.0.0.1", int(port)))


def _listen(text: str) -> socket.socket:
    if text.startswith("unix:"):
        server = socket.socket(socket.AF_UNIX)
        server.bind(text[5:])
    else:
        host, _, port = text.rpartition(":")
        server = socket.create_server((host or "127.0.0.1", int(port)))
    server.listen(1)
    return server


def _cmd_save(args: argparse.Namespace) -> int:
    with demo_memory(args.size_mib, args.tags) as mem, open(args.file, "wb") as out:
        totals = save(mem, out)
        print(f"saved {totals.pages} pages, {totals.bytes} bytes; digest {digest(mem)}")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as f:
        header, _ = inspect(f)
        f.seek(0)
        with gm.GuestMemory.from_layout(header.regions, tags=args.tags) as mem:
            totals = restore(f, mem)
            print(f"restored {totals.pages} pages; digest {digest(mem)}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as f:
        header, totals = inspect(f)
    print(
        f"guestmem stream version {header.version}, page {header.page_size}, "
        f"granule {header.granule_size}, source tags {header.tag_mode.name}"
    )
    for gpa, size in header.regions:
        print(f"  region {gpa:#014x} .. {gpa + size:#014x}  ({size >> 20} MiB)")
    print(f"pages {totals.pages}, rounds {totals.rounds}, bytes {totals.bytes}")
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    with demo_memory(args.size_mib, args.tags) as mem:
        stop = threading.Event()

        def guest() -> None:  # a stand-in for running vCPUs
            rng = np.random.default_rng(1)
            while not stop.is_set():
                mem.write(
                    DEMO_GPA + int(rng.integers(0, mem.regions[0].size // 64)) * 64, b"!" * 64
                )

        writer = threading.Thread(target=guest)
        writer.start()

        def pause() -> None:
            stop.set()
            writer.join()

        bar = progress_bar(mem.regions[0].size // STREAM_PAGE)
        try:
            with _address(args.to) as sock:
                send_live(mem, sock, pause=pause, max_rounds=args.max_rounds, progress=bar)
        finally:
            pause()
        print(f"sent; digest {digest(mem)}")
    return 0


def _cmd_receive(args: argparse.Namespace) -> int:
    with _listen(args.listen) as server:
        conn, _ = server.accept()
        with (
            conn,
            gm.GuestMemory.anonymous(args.size_mib << 20, gpa=DEMO_GPA, tags=args.tags) as mem,
        ):
            bar = progress_bar(mem.regions[0].size // STREAM_PAGE)
            receive(conn, mem, progress=bar)
            print(f"received; digest {digest(mem)}")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate`` and ``inspect`` to a CLI's subcommands."""
    migrate = commands.add_parser("migrate", help="save, restore, send or receive guest memory")
    verbs = migrate.add_subparsers(dest="verb", required=True)
    for name, run, help_text in (
        ("save", _cmd_save, "save a demo guest's memory and tags to FILE"),
        ("restore", _cmd_restore, "restore FILE into a new guest and print its digest"),
    ):
        p = verbs.add_parser(name, help=help_text)
        p.add_argument("file")
        p.add_argument("--tags", default="auto")
        p.add_argument("--size-mib", type=int, default=16)
        p.set_defaults(run=run)
    send = verbs.add_parser("send", help="live-migrate a running demo guest to --to")
    send.add_argument("--to", required=True, help="HOST:PORT or unix:PATH")
    send.add_argument("--max-rounds", type=int, default=8)
    receive_p = verbs.add_parser("receive", help="receive a live migration on --listen")
    receive_p.add_argument("--listen", required=True, help="HOST:PORT or unix:PATH")
    for p in (send, receive_p):
        p.add_argument("--tags", default="auto")
        p.add_argument("--size-mib", type=int, default=16)
    send.set_defaults(run=_cmd_send)
    receive_p.set_defaults(run=_cmd_receive)
    show = commands.add_parser("inspect", help="print a stream's header and totals")
    show.add_argument("file")
    show.set_defaults(run=_cmd_inspect)


def cli_main(argv: Sequence[str]) -> int:
    """Run ``migrate ...`` or ``inspect ...`` on their own (for tests and embedding)."""
    parser = argparse.ArgumentParser(prog="guestmem")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    try:
        return int(args.run(args))
    except gm.GuestMemoryError as error:
        print(f"guestmem: {error}", file=sys.stderr)
        return 1
