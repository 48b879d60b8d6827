"""Tables on the terminal: rich if installed, plain aligned columns otherwise."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TextIO

from guestmem.tools.bench.model import (
    BASELINE,
    CASE_NAMES,
    CHECKS_OFF,
    PER_CALL,
    PER_THREAD,
    Report,
    Result,
)

HEADINGS = {
    BASELINE: "memcpy\n(base)",
    CHECKS_OFF: "memcpy\nchk off",
    "MATCH_ALL": "MATCH\n_ALL",
    PER_CALL: "UT\n/call",
    PER_THREAD: "UT\n/thread",
    "UNCHECKED_THREAD": "UT\n/call",
    "os.readv": "os.readv\n(base)",
}
LEGEND = (
    "memcpy (base): plain memcpy between untagged buffers, the baseline; "
    "chk off: memcpy on guest memory with checks off; UT: UNCHECKED_THREAD, "
    "its prctl pair per call or once per thread; +N: misaligned by N bytes"
)
WIDTH_OFF_TERMINAL = 120
WIDTH_LEGEND = 88
LAYERS = (("native", "warm"), ("native", "cold"), ("python", "warm"))


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], file: TextIO | None = None
) -> None:
    """Print a table; a cell may hold two lines (plain text joins them with a space)."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _plain(title, header, rows, file)
        return
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=WIDTH_OFF_TERMINAL)
    console.print(table)


def _plain(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], file: TextIO | None
) -> None:
    flat = [[cell.replace("\n", " ") for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in flat) for i in range(len(header))]
    print(title, file=file)
    for row in flat:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells), file=file)


def _cell(result: Result | None) -> str:
    if result is None:
        return "-"
    return f"{result.median_gbps:.2f}\n{result.ratio:.2f}x"


def print_report(report: Report, file: TextIO | None = None) -> None:
    """One table per tag mode and timing layer, then tag operations and fixed costs."""
    for mode in report.modes():
        for layer, temperature in LAYERS:
            chosen = {
                (r.size, r.offset, r.case): r
                for r in report.results
                if (r.mode, r.layer, r.temperature) == (mode, layer, temperature)
            }
            if not chosen:
                continue
            cases = [c for c in CASE_NAMES if any(k[2] == c for k in chosen)]
            points = sorted({(size, offset) for size, offset, _ in chosen})
            rows = [
                [_label(size, offset), *(_cell(chosen.get((size, offset, c))) for c in cases)]
                for size, offset in points
            ]
            title = (
                f"{mode} tags, {layer} timing, {temperature}: GB/s and x baseline "
                f"(median of {report.results[0].repeats}) - {report.where}"
            )
            print_table(title, ["size", *(HEADINGS.get(c, c) for c in cases)], rows, file)
    print(textwrap.fill(LEGEND, WIDTH_LEGEND), file=file)
    for name, why in report.skipped.items():
        print(f"{name} tags skipped: {why}", file=file)
    for ops in report.tag_ops:
        print(
            f"tags ({ops['mode']}): set_tags {ops['set_tags_s_per_gib'] * 1e3:.1f} ms/GiB "
            f"(one tag per granule), {ops['set_uniform_tag_s_per_gib'] * 1e3:.1f} ms/GiB "
            f"(one tag), get_tags {ops['get_tags_s_per_gib'] * 1e3:.1f} ms/GiB",
            file=file,
        )
    print_syscall_io(report, file)
    for line in fixed_costs(report):
        print(line, file=file)


def print_syscall_io(report: Report, file: TextIO | None = None) -> None:
    """One table: each route's pipe write + read into guest memory beside os.readv."""
    if not report.syscall_io:
        return
    routes = list(dict.fromkeys(r["route"] for r in report.syscall_io))
    cells = {(r["mode"], r["tag_runs"], r["route"]): r for r in report.syscall_io}
    rows = []
    for mode, runs in dict.fromkeys((r["mode"], r["tag_runs"]) for r in report.syscall_io):
        row = [f"{mode}, {runs} tag run{'s' if runs > 1 else ''}"]
        for route in routes:
            r = cells.get((mode, runs, route)) or cells.get((mode, 1, route))
            row.append(f"{r['median_gbps']:.2f}\n{r['ratio']:.2f}x" if r else "-")
        rows.append(row)
    size = report.syscall_io[0]["size"] >> 10
    title = (
        f"system-call I/O: a {size} KiB pipe write + read into guest memory, GB/s and "
        f"x os.readv into a bytearray (median of {report.syscall_io[0]['repeats']}) "
        f"- {report.where}"
    )
    header = ["guest memory", *(HEADINGS.get(r, r) for r in routes)]
    print_table(title, header, rows, file)


def fixed_costs(report: Report) -> list[str]:
    """The binding's cost per call: Python against native timing at the smallest size."""
    lines = []
    if report.results:
        smallest = min((r.size, r.offset) for r in report.results)
    for mode in report.modes():
        timed = {
            (r.layer, r.case): r
            for r in report.results
            if r.mode == mode and r.temperature == "warm" and (r.size, r.offset) == smallest
        }
        native, python = timed.get(("native", "TCO")), timed.get(("python", "TCO"))
        if native and python:
            lines.append(
                f"{mode}: a {python.size} B TCO read costs {python.ns_per_call:.0f} ns per call "
                f"from Python, {native.ns_per_call:.0f} ns inside the core"
            )
    if report.read64:
        r64 = report.read64
        lines.append(
            f"mem.read(gpa, 64): {r64['read_ns']:.0f} ns; a 64-byte mmap slice: "
            f"{r64['mmap_slice_ns']:.0f} ns ({r64['ratio']:.1f}x)"
        )
    return lines


def _label(size: int, offset: int) -> str:
    from guestmem.tools.bench.plan import Point

    return Point(size, offset).label()
