"""The package's shape, enforced: an import scan of src/guestmem (library, vmm/, tools/).

Every import counts, at the top, inside a function or under TYPE_CHECKING.
The rules (see import_scan): the library never imports vmm/ or tools/, vmm/
never imports tools/; only the binding modules name cffi's ``lib``/``ffi``;
no private name crosses a module boundary; no import cycle.

KNOWN_VIOLATIONS lists what breaks a rule today and is being removed by the
issue-20 item named beside it. It is a ratchet: a new violation fails, and
so does an entry that no longer occurs (delete it when its item lands).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import guestmem as gm
from import_scan import Package, Violation, load_time_cycles, ratchet, scan

# The typed native API's modules (guestmem._native re-exports them).
NATIVE_PARTS = ("access", "kvm", "mapping", "space", "status", "stream", "thread", "virtq")

GUESTMEM = Package(
    root=Path(gm.__file__).parent,
    name="guestmem",
    # The modules that name the compiled core's lib/ffi (the typed API, one
    # module per concern, and the VMM's ioctl marshalling), and the benchmarks'
    # own loops' binding (the build script, _build.py, imports only cffi).
    bindings={
        **{f"guestmem._native.{part}": "guestmem._gm" for part in NATIVE_PARTS},
        "guestmem.vmm.kvm_binding": "guestmem._gm",  # the VMM's raw ioctl marshalling
        "guestmem.tools.bench.native": "guestmem.tools.bench._gmbench",
    },
    front_doors=frozenset({"guestmem.__main__"}),  # it starts the front ends
)

# Item names are issue 20's "What to build" bullets (none left: every rule holds).
KNOWN_VIOLATIONS: dict[str, str] = {}


def _explain(found: set[Violation], keys: list[str]) -> str:
    by_key = {str(v): v for v in found}
    lines = []
    for key in keys:
        detail = by_key[key].detail if key in by_key else ""
        lines.append(f"  {key}" + (f"  (cycle: {detail})" if detail else ""))
    return "\n".join(lines)


def test_the_package_breaks_no_layering_rule_beyond_the_known_ones() -> None:
    found = scan(GUESTMEM)
    new, stale = ratchet(found, KNOWN_VIOLATIONS)
    assert not new, "new layering violations (fix them; see import_scan):\n" + _explain(found, new)
    assert not stale, (
        "allowlisted violations that no longer occur: delete them from KNOWN_VIOLATIONS\n"
        + "\n".join(f"  {key}" for key in stale)
    )


def test_no_import_cycle_runs_at_load_time() -> None:
    # Stricter than the ratchet: even the known circle is type-only or deferred.
    assert not load_time_cycles(GUESTMEM), "import cycles at load time"


def test_the_scan_sees_every_module() -> None:
    modules = GUESTMEM.modules()
    assert {"guestmem", "guestmem.vmm.control", "guestmem.tools.cli"} <= set(modules)
    assert GUESTMEM.layer("guestmem.vmm.control") == "vmm"
    assert GUESTMEM.layer("guestmem.tools.bench.native") == "tools"
    assert GUESTMEM.layer("guestmem.__main__") == "tools"
    assert GUESTMEM.layer("guestmem.migration.endpoint") == "library"


def test_loading_the_library_loads_neither_front_ends_nor_the_vmm() -> None:
    modules = set(GUESTMEM.modules()) - {"guestmem._build"}  # runs at build time only
    library = sorted(m for m in modules if GUESTMEM.layer(m) == "library")
    code = (
        "import importlib, sys\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        "apps = ('guestmem.tools', 'guestmem.vmm', 'guestmem.__main__')\n"
        "print(sorted(m for m in sys.modules if m.startswith(apps)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- the scan can fail: a small package with one of each violation ------------------------

SYNTHETIC = {
    "__init__.py": "from pkg import plain\n",
    "plain.py": "def helper() -> int:\n    return 1\n\n_hidden = 2\n",
    "_native.py": "from pkg._core import ffi, lib\n",
    # library -> vmm, counted although it only runs inside a function
    "uses_vmm.py": "def late():\n    from pkg.vmm import machine\n    return machine\n",
    # library -> tools, counted although guarded by TYPE_CHECKING
    "uses_tools.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.tools import front\n"
    ),
    "vmm/__init__.py": "",
    "vmm/machine.py": "import pkg.tools.front\n",  # vmm -> tools
    "tools/__init__.py": "",
    "tools/front.py": "from pkg import plain\n",
    "raw.py": "from pkg._native import lib\n",  # lib outside the binding module
    "raw_attr.py": "from pkg import _native\nx = _native.ffi\n",
    "raw_core.py": "import pkg._core\n",
    "peek_import.py": "from pkg.plain import _hidden\n",
    "peek_attr.py": "import pkg.plain as p\nx = p._hidden\n",
    "peek_object.py": "def f(thing):\n    return thing._secret\n",
    "mine.py": "class A:\n    def __init__(self):\n        self._own = 1\n"
    "    def f(self, other: 'A'):\n        return other._own\n",
    # a cycle, one of its arrows type-only, another inside a function
    "ring_a.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import ring_b\n"
    ),
    "ring_b.py": "def f():\n    from . import ring_c\n",
    "ring_c.py": "import pkg.ring_a\n",
}


@pytest.fixture
def synthetic(tmp_path: Path) -> Package:
    root = tmp_path / "pkg"
    for name, source in SYNTHETIC.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(source))
    return Package(root=root, name="pkg", bindings={"pkg._native": "pkg._core"})


def test_the_scan_reports_each_kind_of_violation(synthetic: Package) -> None:
    found = {str(v) for v in scan(synthetic)}
    assert found == {
        "layer: pkg.uses_vmm -> pkg.vmm.machine",
        "layer: pkg.uses_tools -> pkg.tools.front",
        "layer: pkg.vmm.machine -> pkg.tools.front",
        "native: pkg.raw -> pkg._native.lib",
        "native: pkg.raw_attr -> pkg._native.ffi",
        "native: pkg.raw_core -> pkg._core",
        "private: pkg.peek_import -> pkg.plain._hidden",
        "private: pkg.peek_attr -> pkg.plain._hidden",
        "private: pkg.peek_object -> ?._secret",
        "cycle: pkg.ring_a -> pkg.ring_a pkg.ring_b pkg.ring_c",
    }


def test_load_time_cycles_leave_out_type_only_and_deferred_imports(
    synthetic: Package,
) -> None:
    assert load_time_cycles(synthetic) == []
    (synthetic.root / "ring_b.py").write_text("import pkg.ring_c\n")
    (synthetic.root / "ring_a.py").write_text("from pkg import ring_b\n")
    assert load_time_cycles(synthetic) == [
        (
            ("pkg.ring_a", "pkg.ring_b", "pkg.ring_c"),
            ("pkg.ring_a", "pkg.ring_b", "pkg.ring_c", "pkg.ring_a"),
        )
    ]


def test_the_scan_names_the_cycle_it_found(synthetic: Package) -> None:
    (cycle,) = (v for v in scan(synthetic) if v.rule == "cycle")
    assert cycle.detail == "pkg.ring_a -> pkg.ring_b -> pkg.ring_c -> pkg.ring_a"


def test_the_ratchet_fails_on_a_new_violation_and_on_a_stale_entry(synthetic: Package) -> None:
    found = scan(synthetic)
    allowed = {str(v) for v in found if v.rule != "native"}
    allowed.add("private: pkg.gone -> pkg.plain._hidden")
    new, stale = ratchet(found, allowed)
    assert new == sorted(str(v) for v in found if v.rule == "native")
    assert stale == ["private: pkg.gone -> pkg.plain._hidden"]
    assert ratchet(found, {str(v) for v in found}) == ([], [])
