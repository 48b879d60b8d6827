"""The ``guestmem`` command: info, bench, migrate, inspect, gdbserve, vmm and vhost-user-blk."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import guestmem as gm
from guestmem.tools import bench
from guestmem.tools import gdbserve as gdbstub_cli
from guestmem.tools import migrate as migration_cli
from guestmem.tools import vhost_user_blk as vhost_user_blk_cli
from guestmem.tools import vmm as vmm_cli
from guestmem.tools.bench import virtio_blk
from guestmem.tools.info import info_rows

Progress = Callable[[int, int, str], None]


def _cmd_info(args: argparse.Namespace) -> int:
    bench.print_table("guestmem info", ["item", "value"], info_rows())
    return 0


@contextmanager
def progress_display() -> Iterator[Progress]:
    """A progress bar on stderr (rich), or a counter line when rich is missing."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    except ImportError:
        yield _plain_progress
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        return
    columns = (TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield update


def _plain_progress(done: int, total: int, what: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r[{done:>4}/{total}] {what:<60}")
        sys.stderr.flush()


def _cmd_bench(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    modes = [gm.TagMode[m.strip().upper()] for m in args.modes.split(",")] if args.modes else None
    if args.virtio_blk:
        return _bench_virtio_blk(args, modes)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise gm.UnsupportedError("--plot needs matplotlib: pip install 'guestmem[bench]'")
    with progress_display() as progress:
        report = bench.run(
            full=args.full, sizes=sizes, repeats=args.repeats, modes=modes, progress=progress
        )
    bench.print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_json(), f, indent=2)
            f.write("\n")
    if args.plot:
        bench.plot(report, args.plot)
    return 0


def _bench_virtio_blk(args: argparse.Namespace, modes: list[gm.TagMode] | None) -> int:
    """The virtio-blk request rate instead of the route comparison."""
    mode: gm.TagMode | str = modes[0] if modes else "auto"
    report = virtio_blk.run(requests=args.requests, repeats=args.repeats, mode=mode)
    virtio_blk.print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


def _repeats(text: str) -> int:
    value = int(text)
    if value < bench.MIN_REPEATS:
        raise argparse.ArgumentTypeError(f"at least {bench.MIN_REPEATS} repeats per figure")
    return value


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"a positive integer, not {text!r}")
    return int(text)


def _sizes(text: str) -> str:
    if not all(part.strip().isdigit() and int(part) > 0 for part in text.split(",")):
        raise argparse.ArgumentTypeError("sizes are positive integers, comma-separated")
    return text


def _modes(text: str) -> str:
    names = {m.name for m in gm.TagMode}
    bad = [m for m in text.split(",") if m.strip().upper() not in names]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown tag mode {bad[0]!r}: one of {sorted(names)}")
    return text


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``guestmem``."""
    top = argparse.ArgumentParser(prog="guestmem", description=gm.__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what this machine supports").set_defaults(run=_cmd_info)
    b = commands.add_parser("bench", help="compare the routes (TCO, bounce buffers, ...)")
    b.add_argument("--full", action="store_true", help="64 B .. 64 MiB, every size cold too")
    b.add_argument("--json", metavar="FILE", help="write every figure to this file")
    b.add_argument("--plot", metavar="FILE.png", help="draw throughput against size (PNG)")
    b.add_argument(
        "--repeats", type=_repeats, default=bench.MIN_REPEATS, help="runs per figure (median)"
    )
    b.add_argument("--sizes", type=_sizes, help="sizes in bytes (comma-separated), all cold too")
    b.add_argument("--modes", type=_modes, help="tag modes (comma-separated); default: all here")
    b.add_argument(
        "--virtio-blk",
        action="store_true",
        help="instead: 4 KiB read requests/s of a Python virtio-blk at queue depth 1 and 32",
    )
    b.add_argument(
        "--requests", type=_positive, default=32768, help="--virtio-blk: requests per run"
    )
    b.set_defaults(run=_cmd_bench)
    migration_cli.add_commands(commands)
    gdbstub_cli.add_commands(commands)
    vmm_cli.add_commands(commands)
    vhost_user_blk_cli.add_commands(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``guestmem``; the exit status is 0 on success."""
    return migration_cli.run_command(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
