"""The library's shape: its modules never import the front ends (guestmem.tools)
or the reference VMM built on it (guestmem.vmm), and the core has no import
cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import guestmem as gm

PACKAGE = Path(gm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Not library: the front ends, the reference VMM, the entry point that starts
# them, the build script.
NOT_LIBRARY = {"tools", "vmm", "__main__.py", "_build.py"}


def library_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for p in PACKAGE.rglob("*.py")
        if not NOT_LIBRARY & set(p.relative_to(PACKAGE).parts)
    }


def imported_at_load(path: Path, known: set[str]) -> set[str]:
    """The guestmem modules a module imports when it is loaded.

    Imports inside functions and under ``if TYPE_CHECKING:`` run later or
    never, so they cannot form a load-time cycle.
    """
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of ``edges`` runs into, as a path."""
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(edges.get(name, ())):
            if state.get(dep) == "open":
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [name, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    return cycles


def test_the_library_never_imports_its_front_ends_or_the_vmm() -> None:
    modules = sorted(library_modules())
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "apps = ('guestmem.tools', 'guestmem.vmm')\n"
        "print(sorted(m for m in sys.modules if m.startswith(apps)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_core_has_no_import_cycles() -> None:
    modules = library_modules()
    graph = {name: imported_at_load(path, set(modules)) for name, path in modules.items()}
    # A package's __init__ gathering its own submodules is its job, not a cycle.
    edges = {
        name: {d for d in deps if not (name and d.startswith(f"{name}."))}
        for name, deps in graph.items()
    }
    cycles = find_cycles(edges)
    assert not cycles, f"import cycles: {cycles}"


def imported_anywhere(path: Path, known: set[str]) -> set[str]:
    """The guestmem modules a module imports anywhere: at load, in functions, for types."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def test_the_core_has_no_cycle_even_through_type_checking_or_function_imports() -> None:
    """memory <-> dma <-> dma_io <-> dma_mapping <-> dirty was one, hidden behind TYPE_CHECKING."""
    modules = library_modules()
    graph = {
        name: {d for d in imported_anywhere(path, set(modules)) if not d.startswith(f"{name}.")}
        for name, path in modules.items()
        if name != "guestmem"  # the package gathers its public names from every layer
    }
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles (any import counts): {cycles}"


# The core's layers and their users below the front ends: no private name
# of another module's object (memory's _plan, _pieces and _move, a region's
# _base) is reached; an object of the module's own classes may be.
CORE = [
    "address_space",
    "mover",
    "memory",
    "tags",
    "dirty",
    "dma",
    "dma_io",
    "dma_mapping",
    "virtio",
    "migration.stream",
]


def test_no_core_module_reaches_another_modules_private_names() -> None:
    offenders = []
    for name in CORE:
        tree = ast.parse((PACKAGE / f"{name.replace('.', '/')}.py").read_text())
        attributes = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
        own = {
            node.attr
            for node in attributes
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        }
        offenders += [
            f"{name}:{node.lineno} {ast.unparse(node)}"
            for node in attributes
            if node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in own
        ]
    assert not offenders, offenders
