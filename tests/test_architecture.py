"""The package's shape: no import cycle inside ``draftkit/`` (imports inside functions count too, since
they run as soon as the function does), the bitmask codec is a leaf, and no module grows past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "draftkit"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, root: Path = ROOT) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """draftkit modules that ``path`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "draftkit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "draftkit":
                continue
            for alias in node.names:  # `from draftkit import console` imports the module draftkit.console
                sub = f"{mod}.{alias.name}"
                found.add(sub if is_module(sub, root) else mod)
    found.discard(me)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    return {module_name(p, root): imports_of(p, root) for p in sorted((root / "draftkit").rglob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_inside_draftkit():
    graph = import_graph()
    assert "draftkit.checkpoint" in graph and graph["draftkit.stages"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_test_sees_imports_inside_functions(tmp_path):
    # The detector itself, on a package like draftkit's old one: modeling imports export inside a
    # function, export imports masks, masks imports modeling.
    pkg = tmp_path / "draftkit"
    (pkg / "sparsify").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sparsify" / "__init__.py").write_text("")
    (pkg / "modeling.py").write_text("import os\n\ndef load():\n    from draftkit.export import read\n")
    (pkg / "export.py").write_text("from draftkit.sparsify.masks import target\n")
    (pkg / "sparsify" / "masks.py").write_text("from draftkit import modeling\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and set(cycle) == {"draftkit.modeling", "draftkit.export", "draftkit.sparsify.masks"}
    (pkg / "sparsify" / "masks.py").write_text("import torch\n")
    assert find_cycle(import_graph(tmp_path)) is None


@pytest.mark.parametrize("leaf", ["draftkit.bitmask", "draftkit._version", "draftkit.errors", "draftkit.answers"])
def test_leaf_modules_import_nothing_from_draftkit(leaf):
    path = PACKAGE.joinpath(*leaf.split(".")[1:]).with_suffix(".py")
    assert imports_of(path) == set()


def test_no_module_over_400_lines():
    long = {
        rel: n for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400 and (rel := str(p.relative_to(ROOT)))
    }
    assert not long, f"split these by responsibility: {long}"


def _calls(path: Path) -> set[str]:
    """Names of the functions and methods ``path`` calls (``f(...)`` and ``x.f(...)``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_only_the_engine_runs_the_layer_loop():
    """Capturing what the decoder layers receive and running a layer on a calibration chunk belong to the engine
    (draftkit/engine/): prune scoring, SparseGPT/Wanda/magnitude and the streamed perplexity plug into its
    ``through_layers`` as per-layer functions instead of looping over the layers themselves."""
    loop = {"capture_layer_inputs", "run_layer", "load_outside"}
    outside = {str(p.relative_to(ROOT)): sorted(_calls(p) & loop) for p in PACKAGE.rglob("*.py")
               if "engine" not in p.relative_to(PACKAGE).parts}
    assert not {k: v for k, v in outside.items() if v}
    users = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "through_layers" in _calls(p)}
    assert {"prune/runner.py", "sparsify/runner.py", "evaluate/streamed.py"} <= users, users
