"""The guestmem command line: its output parses; no timing is asserted."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guestmem import cli

RESULT_FIELDS = {
    "case": str,
    "mode": str,
    "layer": str,
    "temperature": str,
    "size": int,
    "offset": int,
    "median_gbps": float,
    "spread_gbps": float,
    "ratio": float,
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guestmem.cli", *args], capture_output=True, text=True, timeout=600
    )


def check_schema(report: dict[str, Any]) -> None:
    assert report["schema"] == "guestmem-bench/1"
    assert {"machine", "kernel", "mte", "tag modes"} <= report["platform"].keys()
    assert report["where"].startswith(("native", "emulated"))
    assert report["results"], "no figures"
    for result in report["results"]:
        assert result.keys() == RESULT_FIELDS.keys()
        for name, kind in RESULT_FIELDS.items():
            assert isinstance(result[name], kind), (name, result[name])
        assert result["layer"] in ("native", "python")
        assert result["temperature"] in ("warm", "cold")
        assert result["median_gbps"] > 0 and result["ratio"] > 0
    baselines = [r for r in report["results"] if r["case"] == "memcpy untagged"]
    assert baselines and all(r["ratio"] == 1.0 for r in baselines)
    assert {"read_ns", "mmap_slice_ns", "ratio"} <= report["read64"].keys()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_info_lists_the_platform() -> None:
    result = run("info")
    assert result.returncode == 0, result.stderr
    for item in ("architecture", "HWCAP2_MTE", "tag modes here", "routes", "/dev/kvm"):
        assert item in result.stdout


def test_bench_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the host lane has it)")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run(
        "bench",
        "--sizes",
        "64,4099,65536",
        "--repeats",
        "11",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert result.returncode == 0, result.stderr
    assert "memcpy untagged" in result.stdout and "TCO" in result.stdout
    check_schema(json.loads(out.read_text()))
    assert png_size(png) == (1000, 600)


def test_bench_json_without_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--sizes", "4096", "--repeats", "11", "--json", str(out)]) == 0
    check_schema(json.loads(out.read_text()))


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = cli.benchmark.Report(platform={"machine": "x"}, where="native x")
    with pytest.raises(cli.gm.UnsupportedError, match="matplotlib"):
        cli.plot(report, str(tmp_path / "x.png"))
