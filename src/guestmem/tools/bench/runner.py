"""Run the route comparison: every case at every point, in every tag mode here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import guestmem as gm
from guestmem.tools.bench import calls, host, native, plan, syscall_io, tagops
from guestmem.tools.bench.model import CASES, Case, Report, Result, set_ratios
from guestmem.tools.bench.subject import Subject

MIN_REPEATS = 11
TARGET_NS_QUICK = 4_000_000  # each repeat lasts about this long
TARGET_NS_FULL = 10_000_000

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what is next)


@dataclass(frozen=True)
class Step:
    """One figure to measure."""

    mode: gm.TagMode
    case: Case
    point: plan.Point
    layer: str
    temperature: str


def bench_modes() -> list[gm.TagMode]:
    """Every tag mode this machine has."""
    return list(gm.available_tag_modes())


def steps(modes: list[gm.TagMode], chosen: tuple[plan.Point, ...], full: bool) -> list[Step]:
    """The figures of a run, grouped by mode and case (tags change between groups)."""
    out: list[Step] = []
    for mode in modes:
        cases = [c for c in CASES if not (c.needs_tags and mode is gm.TagMode.NONE)]
        for case in cases:
            for point in chosen:
                out.append(Step(mode, case, point, "native", "warm"))
                if point.cold:
                    out.append(Step(mode, case, point, "native", "cold"))
                if full or point.size <= plan.PYTHON_LIMIT_QUICK:
                    out.append(Step(mode, case, point, "python", "warm"))
    return out


def run(
    *,
    full: bool = False,
    sizes: list[int] | None = None,
    repeats: int = MIN_REPEATS,
    modes: list[gm.TagMode] | None = None,
    progress: Progress | None = None,
    tag_ops_size: int | None = None,
) -> Report:
    """Measure; every ratio is to the baseline measured in this same run."""
    chosen = plan.points(full, sizes)
    modes = modes or bench_modes()
    llc = host.last_level_cache()
    target_ns = TARGET_NS_FULL if full else TARGET_NS_QUICK
    tag_bytes = tag_ops_size or (tagops.TAG_OPS_SIZE if full else tagops.TAG_OPS_SIZE // 4)
    report = Report(
        platform=gm.platform_summary(), where=host.where_it_ran(), llc_bytes=llc, full=full
    )
    todo = steps(modes, chosen, full)
    window = plan.window(chosen, llc)
    device = max(p.size for p in chosen)
    done = 0
    for mode in modes:
        mine = [s for s in todo if s.mode is mode]
        try:
            subject = Subject(mode, window, device)
        except gm.GuestMemoryError as error:
            report.skipped[mode.name] = str(error)
            done += len(mine)
            continue
        with subject:
            for step in mine:
                if progress:
                    progress(done, len(todo), _describe(step))
                report.results.append(_measure(subject, step, llc, repeats, target_ns))
                done += 1
        if mode is not gm.TagMode.NONE:
            if progress:
                progress(done, len(todo), f"{mode.name} set_tags/get_tags")
            report.tag_ops.append(tagops.tag_ops(mode, repeats, tag_bytes))
        if progress:
            progress(done, len(todo), f"{mode.name} system-call I/O (pipe into guest memory)")
        report.syscall_io += syscall_io.syscall_io(mode, repeats, target_ns)
    if progress:
        progress(done, len(todo), "read(gpa, 64) against an mmap slice")
    report.read64 = tagops.read64_against_mmap(repeats)
    set_ratios(report.results)
    return report


def _describe(step: Step) -> str:
    return f"{step.mode.name} {step.case.name} {step.point.label()} {step.layer} {step.temperature}"


def _measure(subject: Subject, step: Step, llc: int, repeats: int, target_ns: int) -> Result:
    subject.tags_for(uniform=step.case.needs_tags)
    if step.layer == "python":
        timing = calls.time_python(subject, step.case, step.point, repeats, target_ns)
    else:
        slots = plan.cold_slots(step.point, llc) if step.temperature == "cold" else 1
        timing = native.time_native(subject, step.case, step.point, slots, repeats, target_ns)
    return Result(
        case=step.case.name,
        route=step.case.route,
        mode=step.mode.name,
        layer=step.layer,
        temperature=step.temperature,
        size=step.point.size,
        offset=step.point.offset,
        repeats=repeats,
        iterations=timing.iterations,
        median_gbps=timing.median_gbps,
        spread_gbps=timing.spread_gbps,
    )
