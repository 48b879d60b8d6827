"""What this machine offers guestmem: architecture, MTE, kernel, tag modes, KVM."""

from __future__ import annotations

import os

import guestmem as gm
from guestmem.kvm import KVM_CAP_ARM_MTE
from guestmem.tools.bench.host import last_level_cache, where_it_ran


def kvm_status() -> str:
    """Whether /dev/kvm exists and offers KVM_CAP_ARM_MTE."""
    if not os.path.exists("/dev/kvm"):
        return "absent"
    mte = "yes" if gm.kvm_mte_available() else "no"
    return f"present; KVM_CAP_ARM_MTE ({KVM_CAP_ARM_MTE}): {mte}"


def info_rows() -> list[tuple[str, str]]:
    """What this machine offers, as (item, value) rows."""
    summary = gm.platform_summary()
    return [
        ("architecture", summary["machine"]),
        ("HWCAP2_MTE", summary["mte"]),
        ("kernel", summary["kernel"]),
        ("python", summary["python"]),
        ("tag modes here", summary["tag modes"]),
        ("routes", summary["routes"]),
        ("/dev/kvm", kvm_status()),
        ("last-level cache", f"{last_level_cache() >> 10} KiB"),
        ("figures from", where_it_ran()),
    ]
