"""``guestmem migrate`` and ``guestmem inspect``: streams from the command line."""

from __future__ import annotations

import argparse
import re
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

import guestmem as gm
from guestmem.errors import InsecureChannelWarning
from guestmem.migration import channel
from guestmem.migration.channel import Endpoint, TlsConfig, parse_endpoint
from guestmem.migration.live import Progress, receive, send_live
from guestmem.migration.save import inspect, restore, save
from guestmem.migration.stream import IDLE_TIMEOUT
from guestmem.tools.demo import DEMO_GPA, demo_memory, digest
from guestmem.units import STREAM_PAGE

T = TypeVar("T")


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


DEFAULT_MAX_MEMORY = "4G"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
TAG_MODES = ("auto", "hardware", "software", "none", "kvm")


def memory_size(text: str) -> int:
    """A size with an optional binary suffix (K, M, G, T), e.g. ``512M``."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4G, 512M, 65536)")
    return int(match[1]) * _UNITS[match[2]]


def positive_int(text: str) -> int:
    """A positive whole number."""
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def endpoint_arg(text: str) -> Endpoint:
    """An argparse type: ``unix:PATH`` or ``[tcp:]HOST:PORT`` as an :class:`Endpoint`.

    The library parses (:func:`~guestmem.migration.channel.parse_endpoint`);
    this only turns its UsageError into argparse's error, which names the flag.
    Every front end's endpoint flag uses it.
    """
    try:
        return parse_endpoint(text)
    except gm.UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS config of ``--tls-cert/--tls-key/--tls-ca`` (all three or none), or None."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        args.usage_error("--tls-cert, --tls-key and --tls-ca go together: give all three or none")
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_ca)


def _warnings_to_stderr(open_channel: Callable[[], T]) -> T:
    """Open a channel, printing an insecure-channel warning as one line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InsecureChannelWarning)
        try:
            return open_channel()
        finally:  # warned, then failed to connect: the warning still shows
            for warning in caught:
                print(f"guestmem: WARNING: {warning.message}", file=sys.stderr, flush=True)


def _cmd_save(args: argparse.Namespace) -> int:
    with demo_memory(args.size_mib, args.tags) as mem, open(args.file, "wb") as out:
        totals = save(mem, out)
        print(f"saved {totals.pages} pages, {totals.bytes} bytes; digest {digest(mem)}")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as f:
        header, _ = inspect(f, max_memory=args.max_memory)  # every check before mapping
        f.seek(0)
        with gm.GuestMemory.from_layout(header.regions, tags=args.tags) as mem:
            totals = restore(f, mem)
            print(f"restored {totals.pages} pages; digest {digest(mem)}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as f:
        header, totals = inspect(f, max_memory=args.max_memory)
    print(
        f"guestmem stream version {header.version}, page {header.page_size}, "
        f"granule {header.granule_size}, source tags {header.tag_mode.name}"
    )
    for gpa, size in header.regions:
        print(f"  region {gpa:#014x} .. {gpa + size:#014x}  ({size >> 20} MiB)")
    print(f"pages {totals.pages}, rounds {totals.rounds}, bytes {totals.bytes}")
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    tls = _tls(args)  # its files checked before the guest is made
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
            sock = _warnings_to_stderr(
                lambda: channel.connect(args.to, tls=tls, allow_insecure=args.allow_insecure)
            )
            with sock:
                send_live(mem, sock, pause=pause, max_rounds=args.max_rounds, progress=bar)
        finally:
            pause()
        print(f"sent; digest {digest(mem)}")
    return 0


def _cmd_receive(args: argparse.Namespace) -> int:
    tls = _tls(args)
    listener = _warnings_to_stderr(
        lambda: channel.listen(args.listen, tls=tls, allow_insecure=args.allow_insecure)
    )
    with listener:
        secure = " (TLS, client certificate required)" if listener.tls else ""
        print(f"guestmem: listening on {listener.endpoint}{secure}", file=sys.stderr, flush=True)
        conn = listener.accept()
        with (
            conn,
            gm.GuestMemory.anonymous(args.size_mib << 20, gpa=DEMO_GPA, tags=args.tags) as mem,
        ):
            bar = progress_bar(mem.regions[0].size // STREAM_PAGE)
            receive(conn, mem, progress=bar, idle_timeout=args.idle_timeout)
            print(f"received; digest {digest(mem)}")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate`` and ``inspect`` to a CLI's subcommands."""
    migrate = commands.add_parser("migrate", help="save, restore, send or receive guest memory")
    verbs = migrate.add_subparsers(dest="verb", required=True)
    save_p = verbs.add_parser("save", help="save a demo guest's memory and tags to FILE")
    restore_p = verbs.add_parser("restore", help="restore FILE into a new guest, print its digest")
    send = verbs.add_parser("send", help="live-migrate a running demo guest to --to")
    send.add_argument("--to", required=True, type=endpoint_arg, help="HOST:PORT or unix:PATH")
    send.add_argument("--max-rounds", type=positive_int, default=8, help="pre-copy rounds at most")
    receive_p = verbs.add_parser("receive", help="receive a live migration on --listen")
    receive_p.add_argument(
        "--listen", required=True, type=endpoint_arg, help="HOST:PORT or unix:PATH"
    )
    receive_p.add_argument(
        "--idle-timeout",
        type=float,
        default=IDLE_TIMEOUT,
        help="seconds the sender may stay quiet before the receive fails (default %(default)s)",
    )
    show = commands.add_parser("inspect", help="check a stream whole; print its header and totals")
    for p in (save_p, restore_p, show):
        p.add_argument("file")
    for p in (restore_p, show):
        p.add_argument(
            "--max-memory",
            type=memory_size,
            default=memory_size(DEFAULT_MAX_MEMORY),
            help=f"refuse a stream claiming more guest memory (default {DEFAULT_MAX_MEMORY})",
        )
    for p in (save_p, restore_p, send, receive_p):
        p.add_argument("--tags", default="auto", choices=TAG_MODES, help="tag mode of this side")
    for p in (save_p, send, receive_p):
        p.add_argument("--size-mib", type=positive_int, default=16, help="demo guest size")
    for p in (send, receive_p):
        add_channel_options(p)
    save_p.set_defaults(run=_cmd_save)
    restore_p.set_defaults(run=_cmd_restore)
    send.set_defaults(run=_cmd_send)
    receive_p.set_defaults(run=_cmd_receive)
    show.set_defaults(run=_cmd_inspect)


def add_channel_options(command: argparse.ArgumentParser) -> None:
    """Add ``--tls-cert/--tls-key/--tls-ca`` and ``--allow-insecure`` to a command."""
    tls = command.add_argument_group(
        "TLS (tcp only; all three or none: mutual authentication, TLS 1.3)"
    )
    tls.add_argument("--tls-cert", metavar="PEM", help="this side's certificate")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key (no passphrase)")
    tls.add_argument("--tls-ca", metavar="PEM", help="the CA the peer's certificate must chain to")
    command.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow plain tcp to or from a non-loopback address (anyone on the network "
        "path can read the guest, or send one); warns",
    )
    command.set_defaults(usage_error=command.error)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: an operator's error is one line on stderr and exit status 1."""
    try:
        return int(args.run(args))
    except gm.GuestMemoryError as error:
        print(f"guestmem: {error}", file=sys.stderr)
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"guestmem: {where}{error.strerror or error}", file=sys.stderr)
    return 1


def cli_main(argv: Sequence[str]) -> int:
    """Run ``migrate ...`` or ``inspect ...`` on their own (for tests and embedding)."""
    parser = argparse.ArgumentParser(prog="guestmem")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(list(argv)))
