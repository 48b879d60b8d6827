"""The AArch64 ID registers: the CPU features KVM shows a guest, by KVM register id.

The ID register space is op0=3, op1=0, CRn=0, CRm=1..7 (Arm ARM, D23.3.1):
ID_AA64PFR0_EL1 and its neighbours, the AArch32 ID registers, and
encodings not allocated yet (which read as zero). A guest reads them once
at boot and builds on what they say (MTE and its MTE_STORE_ONLY and
MTE_FAR in ID_AA64PFR1_EL1 and ID_AA64PFR2_EL1, the instruction sets, the
address sizes), so a machine moved to a host whose KVM shows other values
would meet features that vanished under it. Names are known for the
allocated encodings; any other is named by its encoding, as assemblers
write it (``S3_0_C0_C4_3``).
"""

from __future__ import annotations

from guestmem.vmm import kvm_api as k

_NAMES_BY_CRM = {
    1: ("ID_PFR0_EL1", "ID_PFR1_EL1", "ID_DFR0_EL1", "ID_AFR0_EL1",
        "ID_MMFR0_EL1", "ID_MMFR1_EL1", "ID_MMFR2_EL1", "ID_MMFR3_EL1"),
    2: ("ID_ISAR0_EL1", "ID_ISAR1_EL1", "ID_ISAR2_EL1", "ID_ISAR3_EL1",
        "ID_ISAR4_EL1", "ID_ISAR5_EL1", "ID_MMFR4_EL1", "ID_ISAR6_EL1"),
    3: ("MVFR0_EL1", "MVFR1_EL1", "MVFR2_EL1", None,
        "ID_PFR2_EL1", "ID_DFR1_EL1", "ID_MMFR5_EL1", None),
    4: ("ID_AA64PFR0_EL1", "ID_AA64PFR1_EL1", "ID_AA64PFR2_EL1", None,
        "ID_AA64ZFR0_EL1", "ID_AA64SMFR0_EL1", None, "ID_AA64FPFR0_EL1"),
    5: ("ID_AA64DFR0_EL1", "ID_AA64DFR1_EL1", "ID_AA64DFR2_EL1", None,
        "ID_AA64AFR0_EL1", "ID_AA64AFR1_EL1", None, None),
    6: ("ID_AA64ISAR0_EL1", "ID_AA64ISAR1_EL1", "ID_AA64ISAR2_EL1", "ID_AA64ISAR3_EL1",
        None, None, None, None),
    7: ("ID_AA64MMFR0_EL1", "ID_AA64MMFR1_EL1", "ID_AA64MMFR2_EL1", "ID_AA64MMFR3_EL1",
        "ID_AA64MMFR4_EL1", None, None, None),
}  # fmt: skip
NAMES = {
    k.sys_reg(3, 0, 0, crm, op2): name
    for crm, names in _NAMES_BY_CRM.items()
    for op2, name in enumerate(names)
    if name is not None
}


def encoding(reg: int) -> tuple[int, int, int, int, int] | None:
    """(op0, op1, CRn, CRm, op2) of a 64-bit system register id; None for any other id."""
    if reg & ~0xFFFF != k.sys_reg(0, 0, 0, 0, 0):
        return None
    return reg >> 14 & 3, reg >> 11 & 7, reg >> 7 & 0xF, reg >> 3 & 0xF, reg & 7


def is_id_register(reg: int) -> bool:
    """Whether ``reg`` is in the ID register space (op0=3, op1=0, CRn=0, CRm=1..7)."""
    fields = encoding(reg)
    return fields is not None and fields[:3] == (3, 0, 0) and 1 <= fields[3] <= 7


def name(reg: int) -> str:
    """The register's architectural name, or its encoding (``S3_0_C0_C4_3``), or its id."""
    if reg in NAMES:
        return NAMES[reg]
    fields = encoding(reg)
    if fields is None:
        return f"register {reg:#x}"
    op0, op1, crn, crm, op2 = fields
    return f"S{op0}_{op1}_C{crn}_C{crm}_{op2}"
