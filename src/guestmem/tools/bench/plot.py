"""Throughput against size as a PNG: one line per case, log axes, baseline dashed."""

from __future__ import annotations

import guestmem as gm
from guestmem.tools.bench.model import BASELINE, CASE_NAMES, Report

PLOT_SIZE = (10.0, 6.0)  # inches, at PLOT_DPI: 1000 x 600 pixels
PLOT_DPI = 100


def plot(report: Report, path: str) -> None:
    """Draw the native warm figures of each tag mode side by side into ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise gm.UnsupportedError(
            "--plot needs matplotlib: pip install 'guestmem[bench]'"
        ) from error
    modes = report.modes() or ["no results"]
    # Misaligned and odd sizes sit beside their aligned neighbours: draw the aligned ones.
    aligned = [r for r in report.results if r.offset == 0] or report.results
    fig, axes = plt.subplots(1, len(modes), figsize=PLOT_SIZE, squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        for case in CASE_NAMES:
            rows = sorted(
                (r.size, r.offset, r.median_gbps)
                for r in aligned
                if (r.mode, r.layer, r.temperature, r.case) == (mode, "native", "warm", case)
            )
            best = {size: gbps for size, _, gbps in reversed(rows)}  # least misaligned wins
            points = sorted(best.items())
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            if case == BASELINE:
                ax.plot(xs, ys, "k--", linewidth=2, label=f"{case} (baseline)")
            else:
                ax.plot(xs, ys, "-", marker="o", markersize=3, label=case)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes per access")
        ax.set_title(f"{mode} tags", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (10^9 B/s), native timing, warm")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(handles, labels, fontsize=7)
    system = report.platform
    fig.suptitle(
        f"guestmem routes: {system.get('machine', '?')}, kernel {system.get('kernel', '?')}, "
        f"MTE {system.get('mte', '?')} - {report.where}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
