"""The package's layers, read from the source: no import circle, and no layer imports a higher one.

Every ``import`` statement of every module under ``exai/`` counts — at the top, inside a
function (a lazy import still ties the two modules together) and under ``TYPE_CHECKING`` (a type
that names a higher layer is a dependency on it). The table :data:`MAY_IMPORT` is the one in
``docs/architecture.md``: what each package may import besides itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "exai"

#: the shared face of the package: importable from every layer
FACE = {"exai", "exai.errors", "exai.config", "exai.logs"}

#: what each layer may import besides itself and :data:`FACE` (module-name prefixes)
MAY_IMPORT: dict[str, set[str]] = {
    "exai": set(),
    "exai.errors": set(),
    "exai.config": set(),
    "exai.logs": set(),
    "exai.resilience": set(),
    "exai.storage": {"exai.resilience"},
    "exai.providers": {"exai.resilience"},
    "exai.tools": {"exai.resilience", "exai.providers", "exai.storage"},
    "exai.server": {"exai.resilience", "exai.providers", "exai.storage", "exai.tools"},
    # the editor's side shares only the sans-IO wire codec with the daemon
    "exai.client": {"exai.server.protocol", "exai.server.idscan"},
    "exai.testing": set(),
    "exai.cli": {
        "exai.resilience",
        "exai.providers",
        "exai.storage",
        "exai.tools",
        "exai.server",
        "exai.client",
        "exai.testing",
    },
}

#: layers that must never reach the daemon or the command line (issue 14, in so many words)
BELOW_THE_SERVER = ("exai.tools", "exai.providers", "exai.storage", "exai.resilience")


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _resolve(name: str) -> str | None:
    """The module ``name`` refers to (the longest prefix that is a module of ours), or None."""
    while name:
        if name in MODULES:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import statement of ``module``, wherever it is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}") or _resolve(base)
                if target is not None:
                    yield target, node.lineno


def import_graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(m) if t != m} for m in MODULES}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str:
    for layer in sorted(MAY_IMPORT, key=len, reverse=True):
        if module == layer or (layer != "exai" and module.startswith(layer + ".")):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to MAY_IMPORT")


def _allowed(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def test_there_is_no_import_circle_in_the_package():
    assert circles(import_graph()) == []


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        layer_of(module)


def test_nothing_sits_flat_at_the_top_but_the_face_of_the_package():
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert flat == ["errors", "logs"]


@pytest.mark.parametrize("layer", BELOW_THE_SERVER)
def test_the_layers_below_the_daemon_never_import_the_server_or_the_cli(layer):
    wrong = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if module == layer or module.startswith(layer + ".")
        for target, line in imports_of(module)
        if _allowed(target, {"exai.server", "exai.cli"})
    ]
    assert wrong == []


def test_each_layer_imports_only_what_the_architecture_allows():
    wrong = []
    for module in sorted(MODULES):
        layer = layer_of(module)
        allowed = {layer} | FACE | MAY_IMPORT[layer]
        for target, line in imports_of(module):
            if target not in FACE and not _allowed(target, allowed):
                wrong.append(f"{module}:{line} ({layer}) imports {target}")
    assert wrong == []


def test_the_checker_sees_a_circle_through_a_lazy_import():
    graph = {"exai.a": {"exai.b"}, "exai.b": {"exai.c"}, "exai.c": {"exai.a"}, "exai.d": set()}
    assert circles(graph) == [["exai.a", "exai.b", "exai.c"]]
