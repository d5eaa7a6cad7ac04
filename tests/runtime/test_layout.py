"""The runtime's layout: its modules import each other without cycles (module-level imports, as Python runs them)."""

from __future__ import annotations

import ast
from pathlib import Path

import runtime

ROOT = Path(runtime.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module, name: str, modules: set[str]) -> set[str]:
    """Runtime modules imported when this module is imported (not inside functions or ``if TYPE_CHECKING``)."""
    found = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules and n != name}
    return found


def test_runtime_modules_import_without_cycles():
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    graph = {m: top_level_imports(ast.parse(p.read_text()), m, modules) for m, p in paths.items()}
    # importing runtime.a.b first runs the package runtime.a's __init__: an import of a module counts as an import of
    # its packages too, unless the importer is that package or inside it (Python is already running its __init__ then)
    for m in modules:
        for n in list(graph[m]):
            package = n.rpartition(".")[0]
            while package not in ("", "runtime"):
                if package in modules and package != m and not m.startswith(package + "."):
                    graph[m].add(package)
                package = package.rpartition(".")[0]
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*stack, m, n])}"
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])


def test_runtime_is_split_by_concern():
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    assert top == ["__init__", "backend_options", "bundled", "classes", "errors", "files", "generate_cli", "images",
                   "metadata", "pipeline", "tolerances"]
    assert {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} == {
        "sampling", "backends", "generation", "evaluate", "ray", "tuning"}


# Each part of the runtime stands above what it imports (``farm-studio look runtime`` draws them so): an import,
# also one inside a function, goes to the same layer or one below, never back up.
LAYERS = [("errors", "tolerances", "bundled", "files"), ("sampling",), ("metadata",), ("backends",),
          ("classes", "images", "backend_options"), ("pipeline",), ("generation", "tuning"),
          ("ray", "evaluate"), ("generate_cli",)]


def test_no_import_runs_back_up():
    layer = {part: k for k, parts in enumerate(LAYERS) for part in parts}
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("").parts
        if rel == ("__init__",):
            continue  # the package's face hands names on
        here = layer[rel[0]]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:  # from runtime import files
                names = [f"{node.module}.{a.name}" if node.module == "runtime" else node.module for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "runtime" and len(parts) > 1 and layer[parts[1]] > here:
                    found.append(f"{'/'.join(rel)} imports {name}")
    assert not found, found
