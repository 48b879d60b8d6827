"""What GDB is told about the target: an aarch64 GNU/Linux process with MTE.

The target description names the ``org.gnu.gdb.aarch64.core`` registers and
the ``org.gnu.gdb.aarch64.mte`` feature (register ``tag_ctl``): with both, and
the GNU/Linux OS ABI, GDB turns its memory-tagging commands on. Register
values come from a :data:`RegisterProvider` the VMM plugs its vCPU state
into; without one every register reads zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

RegisterProvider = Callable[[], Mapping[str, int]]

# (name, width in bits, GDB type), in register-number order.
REGISTERS: tuple[tuple[str, int, str], ...] = (
    *((f"x{n}", 64, "int") for n in range(31)),
    ("sp", 64, "data_ptr"),
    ("pc", 64, "code_ptr"),
    ("cpsr", 32, "int"),
    ("tag_ctl", 64, "uint64"),
)
_CORE = REGISTERS[:-1]


def _reg(number: int, name: str, bits: int, kind: str) -> str:
    return f'<reg name="{name}" bitsize="{bits}" type="{kind}" regnum="{number}"/>'


TARGET_XML = "\n".join(
    [
        '<?xml version="1.0"?>',
        '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
        "<target>",
        "<architecture>aarch64</architecture>",
        "<osabi>GNU/Linux</osabi>",
        '<feature name="org.gnu.gdb.aarch64.core">',
        *(_reg(n, name, bits, kind) for n, (name, bits, kind) in enumerate(_CORE)),
        "</feature>",
        '<feature name="org.gnu.gdb.aarch64.mte">',
        _reg(len(_CORE), *REGISTERS[-1]),
        "</feature>",
        "</target>",
    ]
).encode()


def no_registers() -> Mapping[str, int]:
    """The provider used when the VMM gives none: every register is zero."""
    return {}


def register_hex(values: Mapping[str, int], number: int) -> str:
    """Register ``number`` in target byte order (little endian), as hex."""
    name, bits, _ = REGISTERS[number]
    value = int(values.get(name, 0)) & ((1 << bits) - 1)
    return value.to_bytes(bits // 8, "little").hex()


def all_registers_hex(values: Mapping[str, int]) -> str:
    """The ``g`` reply: every register in order."""
    return "".join(register_hex(values, n) for n in range(len(REGISTERS)))
