"""Shared fixtures: which tag modes this lane runs, memory layouts, child
processes for faults that kill, and a report of what ran in which mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import guestmem as gm

LANE = os.environ.get("GUESTMEM_LANE", "host")
# Lanes under qemu-aarch64 user emulation (PLATFORM.md section 1): arm64-user
# in Debian 12 (Python 3.11), arm64-trixie in Debian 13 (Python 3.13, no compiler).
QEMU_USER_LANES = {"arm64-user", "arm64-trixie"}
QEMU_USER = LANE in QEMU_USER_LANES
MTE_LANES = QEMU_USER_LANES | {"arm64-kernel"}
MODES = gm.available_tag_modes()
if LANE == "arm64-kernel":  # Python runs ~40x slower there: only what the kernel adds
    MODES = [m for m in MODES if m in (gm.TagMode.HARDWARE, gm.TagMode.KVM)]
TAGGED_MODES = [m for m in MODES if m is not gm.TagMode.NONE]
EMULATED = LANE in MTE_LANES

settings.register_profile(
    "host",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "emulated", max_examples=12, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "kernel", max_examples=4, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile({"host": "host", "arm64-kernel": "kernel"}.get(LANE, "emulated"))

# Two adjacent regions, a hole, and a third: spans, splits and holes.
BASE = 0x4000_0000
REGION = 0x10000
LAYOUT = [(BASE, REGION), (BASE + REGION, REGION), (BASE + 3 * REGION, REGION)]
HOLE = BASE + 2 * REGION

T = TypeVar("T")


def needs_mte(test: T) -> T:
    """Mark a HARDWARE-only test; it says loudly why it cannot run here."""
    skip = pytest.mark.skipif(
        not gm.has_mte(),
        reason="needs MTE hardware (HWCAP2_MTE): runs in the arm64 lanes, not on this host",
    )
    return cast(T, pytest.mark.hardware(skip(test)))


def pytest_configure(config: pytest.Config) -> None:
    if LANE in MTE_LANES and gm.TagMode.HARDWARE not in MODES:
        raise pytest.UsageError(
            f"lane {LANE} must run HARDWARE mode, but this CPU reports no MTE (HWCAP2_MTE)"
        )
    if LANE == "arm64-kernel" and gm.TagMode.KVM not in MODES:
        raise pytest.UsageError("lane arm64-kernel must run KVM mode: no KVM_CAP_ARM_MTE here")


@pytest.fixture(params=MODES, ids=lambda m: m.name)
def mode(request: pytest.FixtureRequest) -> gm.TagMode:
    """Every tag mode this lane has."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=TAGGED_MODES, ids=lambda m: m.name)
def tagged_mode(request: pytest.FixtureRequest) -> gm.TagMode:
    """Every tag mode with tag storage on this lane."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def mem(mode: gm.TagMode) -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.from_layout(LAYOUT, tags=mode) as memory:
        yield memory


@pytest.fixture
def tmem(tagged_mode: gm.TagMode) -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.from_layout(LAYOUT, tags=tagged_mode) as memory:
        yield memory


def snapshot(memory: gm.GuestMemory) -> tuple[list[bytes], list[np.ndarray]]:
    """Every region's bytes and tags, read through routes that cannot fault."""
    data, tags = [], []
    for region in memory.regions:
        data.append(memory.read(region.gpa, region.size, route=gm.Route.TCO))
        tags.append(memory.get_tags(region.gpa, region.size))
    return data, tags


def assert_unchanged(memory: gm.GuestMemory, before: tuple[list[bytes], list[np.ndarray]]) -> None:
    data, tags = snapshot(memory)
    assert data == before[0], "guest data changed"
    for now, then in zip(tags, before[1], strict=True):
        np.testing.assert_array_equal(now, then, err_msg="allocation tags changed")


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python (it may die of a tag-check fault)."""
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def died_of_sigsegv(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode in (-signal.SIGSEGV, 128 + signal.SIGSEGV)


# ---- the lane report: which tests ran in which mode --------------------------------

_outcomes: Counter[tuple[str, str]] = Counter()
# Measured figures a test reports (name -> value), printed and kept in the lane report.
FIGURES: dict[str, object] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[(_mode_of(report), report.outcome)] += 1


def _mode_of(report: pytest.TestReport) -> str:
    if "hardware" in report.keywords:
        return gm.TagMode.HARDWARE.name
    nodeid = report.nodeid
    for m in gm.TagMode:
        if f"[{m.name}" in nodeid or f"-{m.name}" in nodeid:
            return m.name
    return "mode-independent"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    modes = sorted({m for m, _ in _outcomes})
    rows = {m: {o: _outcomes[(m, o)] for o in ("passed", "failed", "skipped")} for m in modes}
    terminalreporter.section(f"guestmem lane {LANE}: tests by tag mode")
    terminalreporter.write_line(f"platform: {gm.platform_summary()}")
    for m, counts in rows.items():
        terminalreporter.write_line(
            f"  {m:<17} passed {counts['passed']:>4}  failed {counts['failed']:>3}  "
            f"skipped {counts['skipped']:>3}"
        )
    for name, value in sorted(FIGURES.items()):
        terminalreporter.write_line(f"  figure {name}: {value}")
    target = os.environ.get("GUESTMEM_LANE_REPORT")
    if target:
        report = {"lane": LANE, "platform": gm.platform_summary(), "modes": rows}
        Path(target).write_text(json.dumps({**report, "figures": FIGURES}, indent=2))
