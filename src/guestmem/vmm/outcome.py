"""How a machine's run ended: a typed reason, what it says, and the run's figures.

The run loop makes an :class:`Outcome`; the front end (``guestmem vmm run``)
decides from its :class:`EndReason` how the process exits. A reason is also
its text (``EndReason.POWER_OFF == "power-off"``), as printed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class EndReason(str, enum.Enum):
    """Why a run ended: the guest's doing, the operator's, a migration's or a failure."""

    POWER_OFF = "power-off"  # PSCI SYSTEM_OFF
    RESET = "reset"  # PSCI SYSTEM_RESET: this VMM does not reboot
    CRASH = "crash"  # KVM_SYSTEM_EVENT_CRASH
    SYSTEM_EVENT = "system event"  # one this VMM does not know; the detail is its number
    QUIT = "quit"  # the operator (Ctrl-A x, ``vmm quit``)
    MIGRATED = "migrated"  # the guest runs on elsewhere now
    ERROR = "error"  # the VMM failed; the detail says where

    def __str__(self) -> str:
        """The reason as text, e.g. ``power-off``."""
        return str(self.value)


@dataclass(frozen=True)
class Outcome:
    """How a run ended (``reason``, ``detail``), with its MMIO exits and seconds."""

    reason: EndReason
    detail: str = ""
    mmio_exits: int = 0
    seconds: float = 0.0
