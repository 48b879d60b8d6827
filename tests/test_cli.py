"""The guestmem command line: its output parses; no timing is ever asserted."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import guestmem as gm
from conftest import EMULATED, LANE
from guestmem.tools import bench, cli

# The JSON report's schema, checked by hand (no jsonschema dependency):
# field -> allowed types; a tuple for a field that may be null.
REPORT_FIELDS: dict[str, Any] = {
    "schema": str,
    "platform": dict,
    "where": str,
    "llc_bytes": int,
    "full": bool,
    "results": list,
    "tag_ops": list,
    "read64": dict,
    "syscall_io": list,
    "skipped": dict,
}
PLATFORM_FIELDS = {"machine", "kernel", "python", "mte", "tag modes", "routes"}
RESULT_FIELDS: dict[str, Any] = {
    "case": str,
    "route": (str, type(None)),
    "mode": str,
    "layer": str,
    "temperature": str,
    "size": int,
    "offset": int,
    "repeats": int,
    "iterations": int,
    "median_gbps": float,
    "spread_gbps": float,
    "ratio": float,
}
TAG_OPS_FIELDS: dict[str, Any] = {
    "mode": str,
    "bytes": int,
    "repeats": int,
    "set_tags_s_per_gib": float,
    "set_uniform_tag_s_per_gib": float,
    "get_tags_s_per_gib": float,
}
READ64_FIELDS = {"read_ns": float, "mmap_slice_ns": float, "ratio": float}
SYSCALL_IO_FIELDS: dict[str, Any] = {
    "mode": str,
    "route": str,
    "tag_runs": int,
    "size": int,
    "repeats": int,
    "iterations": int,
    "median_gbps": float,
    "spread_gbps": float,
    "ratio": float,
}
IO_ROUTES = ("MATCH_ALL", "BOUNCE", "UNCHECKED_THREAD")
CASES = {
    "memcpy untagged": None,
    "memcpy checks off": None,
    "TCO": "TCO",
    "MATCH_ALL": "MATCH_ALL",
    "BOUNCE": "BOUNCE",
    "UNCHECKED_THREAD per call": "UNCHECKED_THREAD",
    "UNCHECKED_THREAD per thread": "UNCHECKED_THREAD",
    "CHECKED": "CHECKED",
}


def check_fields(record: dict[str, Any], fields: dict[str, Any]) -> None:
    assert record.keys() == fields.keys(), sorted(record.keys() ^ fields.keys())
    for name, kind in fields.items():
        value = record[name]
        assert isinstance(value, kind), (name, value)
        assert not (isinstance(value, bool) and kind in (int, float)), (name, value)


def check_schema(report: dict[str, Any], sizes: set[int], modes: set[str]) -> None:
    check_fields(report, REPORT_FIELDS)
    assert report["schema"] == "guestmem-bench/3"
    assert report["platform"].keys() >= PLATFORM_FIELDS
    assert report["where"].startswith(("native ", "emulated "))
    assert report["llc_bytes"] > 0
    results = report["results"]
    assert results, "no figures"
    for r in results:
        check_fields(r, RESULT_FIELDS)
        assert CASES[r["case"]] == r["route"]
        assert r["layer"] in ("native", "python")
        assert r["temperature"] in ("warm", "cold")
        assert r["layer"] == "native" or r["temperature"] == "warm"
        assert r["repeats"] >= 11 and r["iterations"] >= 1
        assert r["median_gbps"] > 0 and r["spread_gbps"] >= 0 and r["ratio"] > 0
    assert {r["size"] for r in results} == sizes
    assert {r["mode"] for r in results} == modes
    seen = {(r["mode"], r["case"], r["layer"], r["temperature"], r["size"]) for r in results}
    for mode in modes:
        cases = set(CASES) - ({"CHECKED"} if mode == "NONE" else set())
        for case in cases:
            for size in sizes:
                for layer, temperature in (
                    ("native", "warm"),
                    ("native", "cold"),
                    ("python", "warm"),
                ):
                    assert (mode, case, layer, temperature, size) in seen
    baselines = [r for r in results if r["case"] == "memcpy untagged"]
    assert all(r["ratio"] == 1.0 for r in baselines)
    for ops in report["tag_ops"]:
        check_fields(ops, TAG_OPS_FIELDS)
    assert {ops["mode"] for ops in report["tag_ops"]} == modes - {"NONE"}
    check_fields(report["read64"], READ64_FIELDS)
    io = report["syscall_io"]
    for row in io:
        check_fields(row, SYSCALL_IO_FIELDS)
        assert row["median_gbps"] > 0 and row["ratio"] > 0
    for mode in modes:
        routes = {(r["route"], r["tag_runs"]) for r in io if r["mode"] == mode}
        layouts = {1} if mode == "NONE" else {1, 256}
        expected = {(route, runs) for route in IO_ROUTES for runs in layouts}
        assert routes == expected | {("os.readv", 1)}, (mode, routes)
    assert all(r["ratio"] == 1.0 for r in io if r["route"] == "os.readv")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guestmem", *args], capture_output=True, text=True, timeout=600
    )


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_info_lists_the_platform() -> None:
    result = run("info")
    assert result.returncode == 0, result.stderr
    for item in ("architecture", "HWCAP2_MTE", "kernel", "tag modes here", "routes", "/dev/kvm"):
        assert item in result.stdout
    assert "SOFTWARE" in result.stdout


def test_bench_json_and_plot(tmp_path: Path) -> None:
    # The plot is pure Python: the host lane draws it (CI installs matplotlib
    # there); the arm64 lanes, without it, still run the benchmark.
    plot = have_matplotlib() or (LANE == "host" and os.environ.get("CI") == "true")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--sizes", "64,4099", "--modes", "software,none", "--json", str(out)]
    result = run(*args, *(["--plot", str(png)] if plot else []))
    assert result.returncode == 0, result.stderr
    assert "memcpy" in result.stdout and "TCO" in result.stdout
    check_schema(json.loads(out.read_text()), {64, 4099}, {"SOFTWARE", "NONE"})
    if plot:
        assert png_size(png) == (1000, 600)


def test_bench_json_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--sizes", "4096", "--modes", "software", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    check_schema(report, {4096}, {"SOFTWARE"})
    checked = [r for r in report["results"] if r["case"] == "CHECKED"]
    assert checked, "CHECKED is measured where tags exist"
    assert "x baseline" in capsys.readouterr().out


def test_plain_tables_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    bench.print_table("t", ["size", "a\nb"], [["64 B", "1.00\n1.00x"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "t" and lines[1].split() == ["size", "a", "b"]
    assert lines[2].split() == ["64", "B", "1.00", "1.00x"]


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = bench.Report(platform={"machine": "x"}, where="native x")
    with pytest.raises(gm.UnsupportedError, match="matplotlib"):
        bench.plot(report, str(tmp_path / "x.png"))


@pytest.mark.parametrize(
    "args",
    [["--repeats", "5"], ["--sizes", "0"], ["--sizes", "x"], ["--modes", "bogus"]],
)
def test_bench_rejects_bad_options(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *args])
    assert exit_.value.code == 2


def test_benchmark_script_runs_the_same_code(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_routes.py"
    if not script.exists():
        pytest.skip("benchmarks/ is not shipped with the wheel")
    out = tmp_path / "routes.json"
    result = subprocess.run(
        [sys.executable, str(script), "--sizes", "64", "--modes", "none", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    check_schema(json.loads(out.read_text()), {64}, {"NONE"})


def test_figures_say_where_they_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUESTMEM_LANE", raising=False)  # found from the CPU, not the lane
    where = bench.where_it_ran()
    if EMULATED:
        assert where.startswith("emulated aarch64 (QEMU's CPU"), where
    else:
        assert where == f"native {os.uname().machine} host"


def test_bench_virtio_blk_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "virtio.json"
    args = ["bench", "--virtio-blk", "--requests", "64", "--repeats", "11", "--modes", "software"]
    assert cli.main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "guestmem-bench-virtio-blk/1" and report["tag_mode"] == "SOFTWARE"
    assert [f["depth"] for f in report["figures"]] == [1, 32]
    assert all(f["device_rate"] > 0 for f in report["figures"])
    assert "virtio-blk" in capsys.readouterr().out
