"""``guestmem vhost-user-blk``: serve a disk image to a vhost-user frontend (QEMU's vhost-user-blk).

``--socket PATH`` is where it listens (mode 0600; given again, it listens on
each: e.g. a live migration's source and target QEMU, which are connected at
once); ``--disk FILE[,ro]`` the image (locked as the VMM locks it: exclusive,
or shared when read-only); ``--tags none|hardware`` how guest memory is
mapped (HARDWARE: PROT_MTE, on MTE hosts). One frontend at a time on each
socket; each gets a fresh virtio-blk device over the one image.
Runs until SIGTERM or SIGINT (exit 0); an operator error is one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from types import FrameType

import guestmem as gm
from guestmem.devices.virtio_blk import VirtioBlock
from guestmem.vhost_user import BackendServer


def _disk(text: str) -> tuple[str, bool]:
    """``FILE`` or ``FILE,ro``."""
    path, _, option = text.partition(",")
    if not path or option not in ("", "ro"):
        raise argparse.ArgumentTypeError(f"not FILE or FILE,ro: {text!r}")
    return path, option == "ro"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``vhost-user-blk`` to a CLI's subcommands."""
    blk = commands.add_parser(
        "vhost-user-blk", help="serve a disk image as a vhost-user-blk backend (for QEMU)"
    )
    blk.add_argument(
        "--socket",
        required=True,
        action="append",
        metavar="PATH",
        help="listen here (mode 0600); repeat to serve one frontend on each at once",
    )
    blk.add_argument(
        "--disk",
        required=True,
        type=_disk,
        metavar="FILE[,ro]",
        help="the disk image (,ro: read-only)",
    )
    blk.add_argument(
        "--tags",
        choices=("none", "hardware"),
        default="none",
        help="none: a plain mapping of guest RAM; hardware: PROT_MTE (MTE hosts)",
    )
    blk.set_defaults(run=run)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    path, read_only = args.disk
    tags = gm.TagMode.HARDWARE if args.tags == "hardware" else gm.TagMode.NONE
    if tags is gm.TagMode.HARDWARE:
        gm.resolve_tag_mode(tags)  # UnsupportedError here, not at the first frontend
    image = VirtioBlock(None, path, read_only=read_only)  # holds the image's lock
    serial = os.path.basename(path).encode()

    def fresh_device() -> VirtioBlock:
        return VirtioBlock.over_fd(None, os.dup(image.fd), read_only=read_only, serial=serial)

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with contextlib.ExitStack() as servers:
            serving = [
                servers.enter_context(BackendServer(socket, fresh_device, tags))
                for socket in args.socket
            ]
            print(
                f"guestmem vhost-user-blk: serving {path}{' (read-only)' if read_only else ''} "
                f"on {', '.join(args.socket)}",
                file=sys.stderr,
                flush=True,
            )
            _serve_all(serving)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        image.close()
    return 0


def _serve_all(servers: list[BackendServer]) -> None:
    """Serve every socket, each on its own thread, until a signal ends the main thread."""
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # wakes for SIGTERM/SIGINT, whose handlers raise here
