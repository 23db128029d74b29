"""The package's layers, measured on its source with ``ast``: no import circle, and imports only run downward.

The layers, bottom to top (docs/design.md, "Module map"): ``utils`` < ``engine`` < ``policies`` < ``pruning``, with
``demo`` and ``data`` beside them, then ``exits``, ``eval``, ``train`` and ``cli`` (the ``dyvte`` command, on top of
everything). ``dyvte/__init__.py`` re-exports from any layer and ``dyvte/__main__.py`` runs the command; no layer
imports either, except that ``cli``, above the public API, uses it (``dyvte.evaluate``, ``dyvte.__version__``).
Every import counts, at module level or inside a function, except those under ``if TYPE_CHECKING:`` (they never
run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dyvte"

#: what each layer may import besides itself
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "engine": {"utils"},
    "policies": {"utils", "engine"},
    "pruning": {"utils", "engine", "policies"},
    "demo": {"utils", "engine"},
    "data": {"utils", "engine", "demo"},
    "exits": {"utils", "engine", "policies", "pruning", "data"},
    "eval": {"utils", "engine", "policies", "pruning", "demo", "data", "exits"},
    "train": {"utils", "engine", "policies", "pruning", "demo", "data", "exits", "eval"},
    "serve": {"utils", "engine", "policies", "pruning", "demo", "data", "exits", "eval"},
    "cli": {"utils", "engine", "policies", "pruning", "demo", "data", "exits", "eval", "train", "serve"},
}

#: the package's entry points, outside every layer: the public API and ``python -m dyvte``
ENTRY_POINTS = {"dyvte", "dyvte.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str], here: str) -> set[str]:
    """The dyvte modules ``tree`` imports at run time (a ``from pkg import sub`` names the submodule)."""
    found: set[str] = set()
    package = here if here in modules and (PACKAGE.parent / here.replace(".", "/") / "__init__.py").exists() else None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = (package or here.rsplit(".", 1)[0]).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "dyvte":
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "dyvte")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(here)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Module -> the dyvte modules it imports, for every module of the package."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(ast.parse(path.read_text()), modules, name) for name, path in paths.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and module not in ENTRY_POINTS else None


def test_every_module_sits_in_a_known_layer(graph):
    assert {_layer(m) for m in graph} - {None} <= set(ALLOWED)
    assert not [m for m in graph if _layer(m) is None and m not in ENTRY_POINTS], (
        "modules must live in a layer's folder"
    )
    assert set(ALLOWED["cli"]) == set(ALLOWED) - {"cli"}  # the command sits on top: it may import every layer


def test_no_upward_or_sideways_import(graph):
    wrong = []
    for module, imported in graph.items():
        layer = _layer(module)
        for target in imported:
            if target == "dyvte" and layer == "cli":
                continue  # the command uses the public API, which never imports the command
            if target in ENTRY_POINTS:
                wrong.append(f"{module} imports the entry point {target}")
            elif layer is not None and _layer(target) not in ALLOWED[layer] | {layer}:
                wrong.append(f"{module} ({layer}) imports {target} ({_layer(target)})")
    assert wrong == []


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles a depth-first search meets (one per back edge)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt in graph and nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return circles


def test_no_import_circle(graph):
    assert _circles(graph) == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    # the same functions on a made-up package: a test that could not fail would prove nothing
    modules = {"dyvte.engine.a", "dyvte.policies.b"}
    engine = ast.parse("def f():\n    from dyvte.policies.b import x\n")
    policy = ast.parse("from dyvte.engine import a\nif TYPE_CHECKING:\n    from dyvte.train import c\n")
    fake = {"dyvte.engine.a": _imports(engine, modules, "dyvte.engine.a")}
    fake["dyvte.policies.b"] = _imports(policy, modules, "dyvte.policies.b")
    assert fake == {"dyvte.engine.a": {"dyvte.policies.b"}, "dyvte.policies.b": {"dyvte.engine.a"}}
    assert _circles(fake) == [["dyvte.engine.a", "dyvte.policies.b", "dyvte.engine.a"]]
    assert "policies" not in ALLOWED["engine"]
