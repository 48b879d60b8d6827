"""What this machine offers for MTE, and the calling thread's check state."""

from __future__ import annotations

import enum
import platform as _stdlib_platform

from guestmem._native import (
    check,
    cpu_has_mte,
)
from guestmem._native import probe_signal_tco as native_probe_signal_tco
from guestmem._native import (
    thread_check_mode as native_check_mode,
)
from guestmem._native import (
    thread_tco as native_tco,
)
from guestmem.kinds import Route, TagMode
from guestmem.units import HOST_PAGE


class CheckMode(enum.IntEnum):
    """The thread's tag-check fault mode (prctl PR_MTE_TCF_*), or its model."""

    NONE = 0
    SYNC = 1
    ASYNC = 2


def has_mte() -> bool:
    """Whether the CPU and kernel offer MTE to user space (HWCAP2_MTE)."""
    return cpu_has_mte()


def thread_tco() -> bool:
    """PSTATE.TCO of the calling thread (the library's model of it without MTE)."""
    return native_tco()


def thread_check_mode() -> CheckMode:
    """The calling thread's tag-check mode (the library's model of it without MTE)."""
    mode = native_check_mode()
    if mode < 0:
        check(mode, "prctl(PR_GET_TAGGED_ADDR_CTRL)")
    return CheckMode(mode)


def probe_signal_tco() -> tuple[bool, bool]:
    """Raise a signal on this thread: (TCO inside its handler, TCO after it returned).

    A real kernel starts handlers with TCO clear (checks on) and gives the
    interrupted code its TCO back; QEMU user emulation starts them with TCO
    set. Needs MTE (UnsupportedError otherwise).
    """
    return native_probe_signal_tco()


def available_tag_modes() -> list[TagMode]:
    """The tag modes a GuestMemory can use here, best first."""
    from guestmem.kvm import kvm_mte_available

    modes = [TagMode.HARDWARE] if has_mte() else []
    if kvm_mte_available():
        modes.append(TagMode.KVM)
    return [*modes, TagMode.SOFTWARE, TagMode.NONE]


def summary() -> dict[str, str]:
    """A flat description of this platform, for logs and ``guestmem info``."""
    return {
        "machine": _stdlib_platform.machine(),
        "kernel": _stdlib_platform.release(),
        "host page": f"{HOST_PAGE // 1024} KiB",
        "python": _stdlib_platform.python_version(),
        "mte": "yes (HWCAP2_MTE)" if has_mte() else "no",
        "tag modes": ", ".join(m.name for m in available_tag_modes()),
        "routes": ", ".join(r.name for r in Route),
    }
