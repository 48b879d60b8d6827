"""The ``guestmem`` command: ``info``, ``bench``, ``migrate`` and ``inspect``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import guestmem as gm
from guestmem import benchmark
from guestmem.kvm import KVM_CAP_ARM_MTE
from guestmem.migration import cli as migration_cli

PLOT_SIZE = (10.0, 6.0)  # inches; saved at 100 dpi: 1000 x 600 pixels
PLOT_DPI = 100


def info_rows() -> list[tuple[str, str]]:
    """What this machine offers, as (item, value) rows."""
    summary = gm.platform_summary()
    kvm = "absent"
    if os.path.exists("/dev/kvm"):
        kvm = f"present; KVM_CAP_ARM_MTE ({KVM_CAP_ARM_MTE}): "
        kvm += "yes" if gm.kvm_mte_available() else "no"
    return [
        ("architecture", summary["machine"]),
        ("kernel", summary["kernel"]),
        ("python", summary["python"]),
        ("HWCAP2_MTE", summary["mte"]),
        ("tag modes here", summary["tag modes"]),
        ("routes", summary["routes"]),
        ("/dev/kvm", kvm),
        ("figures from", benchmark.where_it_ran()),
    ]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on the terminal: rich if installed, plain columns otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
        print(title)
        for row in [header, *rows]:
            print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=False)))
        return
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*map(str, row))
    Console().print(table)


def _cmd_info(args: argparse.Namespace) -> int:
    print_table("guestmem info", ["item", "value"], info_rows())
    return 0


def _size_label(size: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def _bench_tables(report: benchmark.Report) -> None:
    sizes = sorted({r.size for r in report.results})
    for mode in dict.fromkeys(r.mode for r in report.results):
        for layer, temperature in (("native", "warm"), ("native", "cold"), ("python", "warm")):
            rows = []
            for case in benchmark.CASES:
                cells = {
                    r.size: f"{r.median_gbps:.2f} ({r.ratio:.2f}x)"
                    for r in report.results
                    if (r.mode, r.layer, r.temperature, r.case) == (mode, layer, temperature, case)
                }
                if cells:
                    rows.append([case, *(cells.get(s, "-") for s in sizes)])
            if rows:
                title = f"{mode}, {layer} timing, {temperature}: GB/s (x baseline), {report.where}"
                print_table(title, ["case", *map(_size_label, sizes)], rows)
    for ops in report.tag_ops:
        print(
            f"tags ({ops['mode']}): set {ops['set_tags_s_per_gib'] * 1e3:.1f} ms/GiB, "
            f"get {ops['get_tags_s_per_gib'] * 1e3:.1f} ms/GiB"
        )
    r64 = report.read64
    print(
        f"read(gpa, 64) from Python: {r64['read_ns']:.0f} ns, a 64-byte mmap slice "
        f"{r64['mmap_slice_ns']:.0f} ns: {r64['ratio']:.1f}x"
    )


def plot(report: benchmark.Report, path: str) -> None:
    """Throughput against size, one line per case, log axes, baseline dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise gm.UnsupportedError(
            "--plot needs matplotlib: pip install 'guestmem[bench]'"
        ) from error
    modes = list(dict.fromkeys(r.mode for r in report.results))
    fig, axes = plt.subplots(1, len(modes), figsize=PLOT_SIZE, squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        for case in benchmark.CASES:
            points = sorted(
                (r.size, r.median_gbps)
                for r in report.results
                if (r.mode, r.layer, r.temperature, r.case) == (mode, "native", "warm", case)
            )
            if points:
                xs, ys = zip(*points, strict=True)
                style = "--" if case == benchmark.BASELINE else "-"
                ax.plot(xs, ys, style, marker="o", markersize=3, label=case)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes per access")
        ax.set_title(f"{mode} tags")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (native timing, warm)")
    axes[0][0].legend(fontsize=7)  # the first mode has every case
    fig.suptitle(f"guestmem routes on {report.platform['machine']} ({report.where})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def _cmd_bench(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    total = [0]

    def progress(what: str) -> None:
        total[0] += 1
        sys.stderr.write(f"\r[{total[0]:>4}] {what:<60}")
        sys.stderr.flush()

    report = benchmark.run(full=args.full, sizes=sizes, repeats=args.repeats, progress=progress)
    sys.stderr.write("\n")
    _bench_tables(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_json(), f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``guestmem``."""
    top = argparse.ArgumentParser(prog="guestmem", description=gm.__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what this machine supports").set_defaults(run=_cmd_info)
    bench = commands.add_parser("bench", help="compare the routes (TCO, bounce buffers, ...)")
    bench.add_argument("--full", action="store_true", help="64 B .. 64 MiB, every size cold too")
    bench.add_argument("--json", help="write every figure to this file")
    bench.add_argument("--plot", help="draw throughput against size into this PNG")
    bench.add_argument("--repeats", type=int, default=11, help="runs per figure (median)")
    bench.add_argument("--sizes", help="comma-separated sizes in bytes, instead of the defaults")
    bench.set_defaults(run=_cmd_bench)
    migration_cli.add_commands(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``guestmem``; the exit status is 0 on success."""
    args = parser().parse_args(argv)
    if args.command == "bench" and args.repeats < 11:
        print("guestmem: note: fewer than 11 repeats per figure", file=sys.stderr)
    try:
        return int(args.run(args))
    except gm.GuestMemoryError as error:
        print(f"guestmem: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
