"""What a benchmark run produces: the cases, one Result per figure, the Report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = "guestmem-bench/3"

BASELINE = "memcpy untagged"
CHECKS_OFF = "memcpy checks off"
PER_CALL = "UNCHECKED_THREAD per call"
PER_THREAD = "UNCHECKED_THREAD per thread"


@dataclass(frozen=True)
class Case:
    """One way of copying: a plain memcpy, or a route in one kind of scope."""

    name: str
    route: str | None  # the guestmem.Route's name; None for plain memcpy
    thread_scope: bool = False  # run inside one unchecked_thread() scope
    needs_tags: bool = False  # CHECKED: meaningless without tag storage


CASES: tuple[Case, ...] = (
    Case(BASELINE, None),
    Case(CHECKS_OFF, None),
    Case("TCO", "TCO"),
    Case("MATCH_ALL", "MATCH_ALL"),
    Case("BOUNCE", "BOUNCE"),
    Case(PER_CALL, "UNCHECKED_THREAD"),
    Case(PER_THREAD, "UNCHECKED_THREAD", thread_scope=True),
    Case("CHECKED", "CHECKED", needs_tags=True),
)
CASE_NAMES: tuple[str, ...] = tuple(c.name for c in CASES)


@dataclass
class Result:
    """One case at one size: median throughput, spread, ratio to the baseline."""

    case: str
    route: str | None
    mode: str
    layer: str  # "native" (clock_gettime around a native loop) or "python" (per call)
    temperature: str  # "warm" (same buffer) or "cold" (rotating over > 4x the LLC)
    size: int
    offset: int  # misalignment of the guest address (and the baseline's source)
    repeats: int
    iterations: int  # accesses per repeat
    median_gbps: float
    spread_gbps: float  # max - min over the repeats
    ratio: float = 0.0  # to BASELINE, same mode, layer, temperature, size and offset

    @property
    def ns_per_call(self) -> float:
        """Nanoseconds per access at the median rate."""
        return self.size / self.median_gbps


@dataclass
class Report:
    """Everything one run measured, and where."""

    platform: dict[str, str]
    where: str
    llc_bytes: int = 0
    full: bool = False
    results: list[Result] = field(default_factory=list)
    tag_ops: list[dict[str, Any]] = field(default_factory=list)
    read64: dict[str, float] = field(default_factory=dict)
    syscall_io: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # tag mode -> why
    schema: str = SCHEMA

    def modes(self) -> list[str]:
        """The tag modes measured, in run order."""
        return list(dict.fromkeys(r.mode for r in self.results))

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def set_ratios(results: list[Result]) -> None:
    """Fill each result's ratio to the baseline measured beside it."""
    base = {
        (r.mode, r.layer, r.temperature, r.size, r.offset): r.median_gbps
        for r in results
        if r.case == BASELINE
    }
    for r in results:
        reference = base.get((r.mode, r.layer, r.temperature, r.size, r.offset))
        r.ratio = r.median_gbps / reference if reference else 0.0
