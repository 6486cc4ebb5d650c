"""The package's import graph, counting imports inside functions and type-only imports too: the wings are
stacked so that every import runs down (or stays inside its wing), and there is no cycle: if two modules
need each other, a third, lower one is missing. No module is over 400 lines: past that it does two jobs."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"
# Top to bottom: a module may import its own wing and the wings after it. `finetune.__main__` stands above
# them all; the package root (its version) and `finetune.errors` below them all.
WINGS = ("cli", "run", "tasks", "rl", "use", "training", "hub", "data", "models", "recipe", "launch")
LONGEST = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str], own: str | None = None) -> set[str]:
    """Package modules `path` imports anywhere in its body (in functions and under `if TYPE_CHECKING:` too)."""
    found: set[str] = set()
    own = own or module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package.rsplit(".", node.level - 1)[0], base]).rstrip(".")
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != own}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) for f in files}


def rank(module: str) -> int:
    """The module's height: 0 for the top wing, len(WINGS) for the root and errors, -1 for __main__."""
    if module == "finetune.__main__":
        return -1
    parts = module.split(".")
    return WINGS.index(parts[1]) if len(parts) > 1 and parts[1] in WINGS else len(WINGS)


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs up the stack of wings, as 'importer -> imported'."""
    return [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]) if rank(b) < rank(a)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_walk_sees_function_local_and_type_only_imports(tmp_path):
    graph = import_graph()
    assert "finetune.launch.environment" in graph["finetune.cli.tools"]  # imported inside `finetune env`'s body only
    assert "finetune.recipe.tasks" in graph["finetune.recipe.schema"]
    typed = tmp_path / "typed.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from finetune.cli.app import app\n")
    assert imports(typed, set(graph), own="finetune.data.typed") == {"finetune.cli.app"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward({"finetune.data.chat": {"finetune.training.rundir", "finetune.errors"},
                   "finetune.__main__": {"finetune.cli.app"}}) == ["finetune.data.chat -> finetune.training.rundir"]


def test_every_package_folder_is_a_wing():
    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()) == sorted(WINGS)


def test_each_wing_says_what_it_may_import():
    for i, wing in enumerate(WINGS):
        doc = " ".join(ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text())).split())
        below = WINGS[i + 1:]
        said = f"May import the wings below it ({', '.join(below)}) and errors." if below else "May import errors only."
        assert said in doc, f"finetune/{wing}/__init__.py: {doc}"


def test_imports_run_down_the_wings():
    assert upward(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []



def test_no_module_over_400_lines():
    long = {str(f.relative_to(PACKAGE)): n for f in sorted(PACKAGE.rglob("*.py"))
            if (n := len(f.read_text().splitlines())) > LONGEST}
    assert long == {}
