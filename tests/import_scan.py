"""An import scan of a package: which layering rules its modules break.

Reads every module's source (nothing is imported) and counts every import,
wherever it stands: at the top, inside a function, or under
``if TYPE_CHECKING:`` (a type-only edge is still an arrow in the design).

The rules, for a package ``P``:

- ``layer``: the library (everything outside ``P.vmm`` and ``P.tools``)
  never imports ``P.vmm`` or ``P.tools``; ``P.vmm`` never imports ``P.tools``.
- ``native``: only the binding modules name cffi's ``lib``/``ffi`` (no other
  module imports them, or a compiled extension, or reads ``module.lib``).
- ``private``: no private name (one leading underscore) crosses a module
  boundary: ``from x import _y``, ``x._y`` on an imported module or class,
  and ``obj._y`` where this module defines no ``_y`` itself.
- ``cycle``: no import cycle among the modules (a package's ``__init__``
  gathering its own submodules is its job, not a cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

LAYERS = ("library", "vmm", "tools")
# Not private in the sense the rules mean: the standard library's own
# documented names that happen to start with an underscore.
STDLIB_UNDERSCORE = frozenset({"_exit", "_asdict", "_replace", "_fields", "_make"})


@dataclass(frozen=True, order=True)
class Violation:
    """One broken rule: ``rule``, the module that breaks it, and what it reaches."""

    rule: str
    module: str
    target: str
    detail: str = field(default="", compare=False)  # e.g. one cycle's path

    def __str__(self) -> str:
        """``rule: module -> target``, the form the allowlist is written in."""
        return f"{self.rule}: {self.module} -> {self.target}"


@dataclass(frozen=True)
class Package:
    """A package to scan: its directory, its name and who may bind native code."""

    root: Path
    name: str
    bindings: Mapping[str, str]  # binding module -> the compiled cffi module it alone names
    front_doors: frozenset[str] = frozenset()  # modules counted as front ends (tools)

    def modules(self) -> dict[str, Path]:
        """Every module's dotted name and its source file."""
        found = {}
        for source in sorted(self.root.rglob("*.py")):
            parts = source.relative_to(self.root).with_suffix("").parts
            dotted = (self.name, *(parts[:-1] if parts[-1] == "__init__" else parts))
            found[".".join(dotted)] = source
        return found

    def layer(self, module: str) -> str:
        """``library``, ``vmm`` or ``tools``."""
        for layer in ("vmm", "tools"):
            if module == f"{self.name}.{layer}" or module.startswith(f"{self.name}.{layer}."):
                return layer
        return "tools" if module in self.front_doors else "library"


@dataclass(frozen=True)
class Edge:
    """``module`` imports ``target`` (a module of the package), taking ``names`` from it."""

    module: str
    target: str
    names: tuple[str, ...]  # the names taken from ``target`` (``from t import a, b``)


def scan(package: Package) -> set[Violation]:
    """Every rule ``package`` breaks."""
    modules = package.modules()
    known = set(modules) | set(package.bindings.values())
    graph: dict[str, set[str]] = {name: set() for name in modules}
    found: set[Violation] = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = list(_edges(tree, name, path.name == "__init__.py", known))
        graph[name].update(e.target for e in edges if e.target in modules)
        found.update(_layer_violations(package, name, edges))
        found.update(_native_violations(package, name, edges, tree, known))
        found.update(_private_violations(name, edges, tree, known))
    for members, ring in cycles(graph):
        found.add(Violation("cycle", members[0], " ".join(members), " -> ".join(ring)))
    return found


def load_time_cycles(package: Package) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The cycles among imports that run when a module loads: no allowlist covers these.

    Left out: imports inside functions and under ``if TYPE_CHECKING:``.
    """
    modules = package.modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.Module(
            body=list(_run_at_load(ast.parse(path.read_text()).body)), type_ignores=[]
        )
        edges = _edges(tree, name, path.name == "__init__.py", set(modules))
        graph[name] = {e.target for e in edges}
    return cycles(graph)


def _run_at_load(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            yield from _run_at_load(node.body)
            yield from _run_at_load(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, *(h.body for h in node.handlers), node.orelse):
                yield from _run_at_load(part)


def ratchet(found: Iterable[Violation], allowed: Iterable[str]) -> tuple[list[str], list[str]]:
    """What is found but not allowed (new), and what is allowed but no longer found (stale)."""
    seen = {str(v) for v in found}
    allow = set(allowed)
    return sorted(seen - allow), sorted(allow - seen)


# -- the edges ------------------------------------------------------------------------------


def _edges(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> Iterator[Edge]:
    """Every import of a package module in ``tree``, wherever it stands."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _nearest(alias.name, known)
                if target is not None:
                    yield Edge(module, target, ())
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    yield Edge(module, submodule, ())
                elif base in known:
                    yield Edge(module, base, (alias.name,))


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join([*parts[:keep], *([node.module] if node.module else [])])


def _nearest(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def _bound_modules(tree: ast.Module, known: set[str]) -> dict[str, str]:
    """Local names bound to package modules (``import p.x as x``, ``from p import x``)."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


# -- the rules ------------------------------------------------------------------------------


def _layer_violations(package: Package, module: str, edges: list[Edge]) -> Iterator[Violation]:
    rank = LAYERS.index(package.layer(module))
    for edge in edges:
        if LAYERS.index(package.layer(edge.target)) > rank:
            yield Violation("layer", module, edge.target)


def _native_violations(
    package: Package, module: str, edges: list[Edge], tree: ast.Module, known: set[str]
) -> Iterator[Violation]:
    own = package.bindings.get(module)
    extensions = set(package.bindings.values())
    for edge in edges:
        if edge.target == own:
            continue
        if edge.target in extensions:
            yield Violation("native", module, edge.target)
        for name in edge.names:
            if name in ("lib", "ffi"):
                yield Violation("native", module, f"{edge.target}.{name}")
    bound = _bound_modules(tree, known)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("lib", "ffi")
            and isinstance(node.value, ast.Name)
            and bound.get(node.value.id, own) != own
        ):
            yield Violation("native", module, f"{bound[node.value.id]}.{node.attr}")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_violations(
    module: str, edges: list[Edge], tree: ast.Module, known: set[str]
) -> Iterator[Violation]:
    for edge in edges:
        for name in edge.names:
            if _is_private(name):
                yield Violation("private", module, f"{edge.target}.{name}")
    bound = _bound_modules(tree, known)
    imported = {name for edge in edges for name in edge.names}
    foreign = _foreign_modules(tree, known)
    own = _defined_here(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        if node.attr in STDLIB_UNDERSCORE:
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in bound:
            target = f"{bound[value.id]}.{node.attr}"
            if target not in known:  # a package-private module is the package's own
                yield Violation("private", module, target)
        elif isinstance(value, ast.Name) and value.id in imported:
            yield Violation("private", module, f"{value.id}.{node.attr}")
        elif isinstance(value, ast.Name) and value.id in foreign:
            continue  # another project's private name is that project's business
        elif node.attr not in own:
            yield Violation("private", module, f"?.{node.attr}")


def _foreign_modules(tree: ast.Module, known: set[str]) -> set[str]:
    """Local names bound to modules outside the package (``import argparse``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _nearest(alias.name, known) is None:
                    names.add(alias.asname or alias.name.split(".")[0])
    return names


def _defined_here(tree: ast.Module) -> set[str]:
    """Every name this module itself defines: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store | ast.Del):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)  # dataclasses.replace(x, _field=...), a field of its own
        elif isinstance(node, ast.Constant) and str(node.value).isidentifier():
            names.add(str(node.value))  # __slots__ = ("_a", ...), getattr(x, "_a")
    return names


# -- cycles ---------------------------------------------------------------------------------


def cycles(graph: Mapping[str, set[str]]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Each import cycle: its modules (sorted) and one cycle through them, as a path.

    A package's ``__init__`` importing its own submodules is left out.
    """
    edges = {
        name: sorted(d for d in deps if d != name and not d.startswith(f"{name}."))
        for name, deps in graph.items()
    }
    found = []
    for component in _strongly_connected(edges):
        if len(component) > 1:
            members = tuple(sorted(component))
            found.append((members, _cycle_through(members, edges)))
    return sorted(found)


def _strongly_connected(edges: Mapping[str, list[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, without recursion."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for dep in successors:
                if dep not in edges:
                    continue
                if dep not in index:
                    index[dep] = low[dep] = len(index)
                    stack.append(dep)
                    on_stack.add(dep)
                    work.append((dep, iter(edges[dep])))
                    break
                if dep in on_stack:
                    low[node] = min(low[node], index[dep])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def _cycle_through(members: tuple[str, ...], edges: Mapping[str, list[str]]) -> tuple[str, ...]:
    """A shortest cycle from the first member back to itself, inside the component."""
    start, inside = members[0], set(members)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for dep in edges[node]:
                if dep == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return (*reversed(path), start)
                if dep in inside and dep not in came_from:
                    came_from[dep] = node
                    following.append(dep)
        frontier = following
    return members
