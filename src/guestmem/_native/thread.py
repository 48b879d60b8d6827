"""The CPU's MTE and the calling thread's check state, as the core sees and changes them."""

from __future__ import annotations

from guestmem._gm import ffi, lib
from guestmem._native.status import check

ROUTE_VALUES: dict[str, int] = {
    "TCO": lib.GM_ROUTE_TCO,
    "MATCH_ALL": lib.GM_ROUTE_MATCH_ALL,
    "BOUNCE": lib.GM_ROUTE_BOUNCE,
    "UNCHECKED_THREAD": lib.GM_ROUTE_UNCHECKED_THREAD,
    "CHECKED": lib.GM_ROUTE_CHECKED,
}
"""``enum gm_route``'s values by name."""

MODE_VALUES: dict[str, int] = {
    "NONE": lib.GM_MODE_NONE,
    "SOFTWARE": lib.GM_MODE_SOFTWARE,
    "HARDWARE": lib.GM_MODE_HARDWARE,
    "KVM": lib.GM_MODE_KVM,
}
"""``enum gm_mode``'s values by name."""


def cpu_has_mte() -> bool:
    """Whether the CPU and kernel offer MTE to user space (HWCAP2_MTE)."""
    return bool(lib.gm_cpu_has_mte())


def thread_tco() -> bool:
    """PSTATE.TCO of the calling thread (the core's model of it without MTE)."""
    return bool(lib.gm_thread_tco())


def thread_check_mode() -> int:
    """The calling thread's PR_MTE_TCF_* mode number; a negative native status on failure."""
    return int(lib.gm_thread_check_mode())


def probe_signal_tco() -> tuple[bool, bool]:
    """Raise a signal on this thread: (TCO inside its handler, TCO after it returned)."""
    in_handler = ffi.new("int *")
    after = ffi.new("int *")
    check(lib.gm_probe_signal_tco(in_handler, after), "probe_signal_tco")
    return bool(in_handler[0]), bool(after[0])


def enable_mte(what: str = "enabling the tagged-address ABI") -> None:
    """Turn on the calling thread's tagged-address ABI and synchronous checks."""
    check(lib.gm_thread_enable_mte(), what)


def unchecked_enter(what: str) -> None:
    """Set PSTATE.TCO for the calling thread (one nesting level more)."""
    check(lib.gm_unchecked_enter(), what)


def unchecked_exit(what: str) -> None:
    """Undo one :func:`unchecked_enter`."""
    check(lib.gm_unchecked_exit(), what)


def unchecked_thread_enter(what: str) -> None:
    """Turn the calling thread's tag checks off (one nesting level more)."""
    check(lib.gm_unchecked_thread_enter(), what)


def unchecked_thread_exit(what: str) -> None:
    """Undo one :func:`unchecked_thread_enter`: the previous mode comes back at the outermost."""
    check(lib.gm_unchecked_thread_exit(), what)
