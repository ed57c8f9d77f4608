"""The package's shape: no import circles, and the method package imports nothing of the project.

Every ``import`` in ``lmms_sgl/`` counts, also those inside functions (a lazy import still ties two
modules together); ``if TYPE_CHECKING:`` blocks do not run and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lmms_sgl"

# Who may import whom, package by package: an adapter sits above the pipeline, the pipeline above
# the families, the families above the method. A package missing here may import any project package.
FORBIDDEN = {
    "method": {"*"},  # pure tensor code: nothing of the project outside method/
    # the competitors: their rules and registered methods, on method/'s seams only
    "baselines": {
        "families",
        "pipeline",
        "lmms",
        "reporting",
        "benchmarks",
        "proving",
        "calibration",
        "factory",
        "costs",
    },
    "families": {"pipeline", "lmms", "reporting", "benchmarks", "proving", "calibration", "factory", "costs"},
    "pipeline": {"lmms", "reporting", "benchmarks", "proving", "calibration", "factory", "costs"},
    "checkpoints": {"families", "pipeline", "lmms", "reporting", "benchmarks", "proving", "calibration"},
    "reporting": {"lmms", "benchmarks", "proving", "calibration", "factory"},
    "factory": {"pipeline", "lmms", "reporting", "benchmarks", "proving", "calibration"},
    "sweep": {"proving", "benchmarks"},  # the proving study is built on the sweep, not the reverse
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in ROOT.rglob("*.py")}


def _skipped(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules a module imports (``from pkg import submodule`` resolves to the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _skipped(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {target for target in found if target in known and target != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, name, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_packages_import_only_downwards():
    wrong = []
    for module, targets in graph().items():
        source = package_of(module)
        forbidden = FORBIDDEN.get(source, set())
        for target in targets:
            other = package_of(target)
            if other == source or other in ("", "_tv_compat"):
                continue
            if "*" in forbidden or other in forbidden:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_package_says_what_it_is_for_and_may_import():
    for init in ROOT.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init} has no docstring"
        assert "import" in doc, f"{init}: its docstring should say what the package may import"


def test_the_checker_finds_a_circle():
    """The walker itself can fail: a made-up three-module circle and a clean chain."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
