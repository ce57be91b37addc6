"""The floor plan, enforced: the import graph of bridge/ and stack/ read from the source.

Rules (docs/DESIGN.md "The house"):
- Layers, lowest first: `stack.wire` (header formats) < the rest of `stack` (TCP) < the bridge
  core (bridge/*.py, bridge/userspace/, bridge/inspect/) < the adapters (bridge/io/,
  bridge/kernel/, bridge/deploy/, bridge/cli.py, bridge/ctl.py, bridge/__main__.py) < the lab
  (bridge/lab/).
  A module imports only from its own layer or below: stack imports nothing of bridge,
  stack.wire nothing of the rest of stack, the core nothing of an adapter or the lab.
- No import cycles between modules. Every import counts: at module level, inside a function
  (which hides a cycle from Python, not from a reader) or under `TYPE_CHECKING`.
- No module uses another's private names: neither `from x import _name` nor `x._name` on an
  imported module, nor `obj._name` where `_name` is defined in no class or function of the
  module that reads it (a name private to another module's class); `self._name` is the
  object's own, whichever class of its hierarchy defined it.

Theory: `ast` reads every .py file of the two packages once (nothing is imported or run);
imports are resolved to project modules (a package import to its __init__), and the graph is
searched for strongly connected components (Tarjan).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bridge", "stack")
# Private names of the standard library and of our dependencies that are public by contract.
ALLOWED_PRIVATE = frozenset({"_replace", "_asdict", "_fields", "_make", "_exit", "_getframe",
                             "_name_", "_value_", "_missing_", "_generate_next_value_"})


@cache
def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


@cache
def tree(mod: str) -> ast.Module:
    return ast.parse(modules()[mod].read_text(), filename=str(modules()[mod]))


def _resolve(name: str) -> str | None:
    """The project module `name` denotes (or the longest project prefix of it), or None."""
    mods = modules()
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(mod: str) -> dict[str, list[str]]:
    """{project module imported: [names taken from it]} for every import statement of `mod`."""
    out: dict[str, list[str]] = {}
    is_pkg = modules()[mod].name == "__init__.py"
    for node in ast.walk(tree(mod)):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name)
                if target is not None:
                    out.setdefault(target, [])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = _resolve(f"{base}.{a.name}")
                if sub is not None and sub == f"{base}.{a.name}":
                    out.setdefault(sub, [])  # `from package import module`
                    continue
                target = _resolve(base)
                if target is not None:
                    out.setdefault(target, []).append(a.name)
    out.pop(mod, None)
    return out


def layer(mod: str) -> int:
    if mod.startswith("stack.wire"):
        return 0
    if mod.startswith("stack"):
        return 1
    if mod.startswith("bridge.lab"):
        return 4
    if mod.startswith(("bridge.io", "bridge.kernel", "bridge.ebpf", "bridge.deploy")) or mod in (
            "bridge.cli", "bridge.ctl", "bridge.__main__"):
        return 3
    return 2


LAYER_NAMES = ("stack.wire", "stack", "bridge core", "adapter", "lab")


def test_every_import_goes_down_or_sideways() -> None:
    broken = [f"{m} ({LAYER_NAMES[layer(m)]}) imports {t} ({LAYER_NAMES[layer(t)]})"
              for m in modules() for t in imports(m) if layer(t) > layer(m)]
    assert not broken, "\n".join(broken)


def test_no_import_cycles() -> None:
    graph = {m: sorted(imports(m)) for m in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    assert not cycles, cycles


def _own_names(mod: str) -> set[str]:
    """Names `mod` defines: functions, classes, methods, assigned attributes and variables."""
    names: set[str] = set()
    for node in ast.walk(tree(mod)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in ALLOWED_PRIVATE


def test_no_module_uses_another_modules_private_names() -> None:
    found: list[str] = []
    for mod in modules():
        for target, names in imports(mod).items():
            found += [f"{mod}: from {target} import {n}" for n in names if _private(n)]
        own = _own_names(mod)
        for node in ast.walk(tree(mod)):
            if (isinstance(node, ast.Attribute) and _private(node.attr)
                    and node.attr not in own
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls"))):
                found.append(f"{mod}:{node.lineno}: .{node.attr}")
    assert not found, "\n".join(found)
