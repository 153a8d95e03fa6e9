"""The project's import graph: no cycles among modules, ProbSAMLib independent of Training and Slicer, and no
module importing a script that parses the command line when imported.

The graph is read from the source (ast), not by importing anything, so it sees every import: at the top of a
module, inside functions (the lazy ones that keep ``import ProbSAMLib`` free of torch), and the names a
module hands to ``importlib.import_module`` (ProbSAMLib/__init__.py's lazy public API). A cycle hidden in a
function body breaks as soon as someone calls that function first, so it counts like any other.

Edges: ``import a.b`` and ``from a import b`` (b a module) go to ``a.b``; ``from a import name`` (name an
attribute) goes to ``a`` (its __init__), also from inside ``a``. The parent packages Python imports on the
way (``a`` for ``a.b``) are not edges: a package __init__ importing its own submodule is how packages work.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ProbSAMLib", "Training")
# Never imported by the library: the training code, and what exists only inside 3D Slicer.
FORBIDDEN_IN_LIBRARY = ("Training", "slicer", "qt", "ctk", "vtk", "ProbSAMSlicer")
_PARSERS = ("parse_args", "parse_intermixed_args", "parse_known_args", "parse_known_intermixed_args")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict:
    """{module name: path} of every .py file of the project's packages."""
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _absolute(module: str, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of a relative import (``from .x import y``) made in ``importer``."""
    if not level:
        return module or ""
    base = importer.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def imported_names(path: Path, importer: str) -> list:
    """(line, imported module or module.attribute, how) for every import anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, "import") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, importer, is_package)
            found += [(node.lineno, f"{module}.{alias.name}" if alias.name != "*" else module, "from")
                      for alias in node.names]
    if _calls_import_module(tree):
        # A module that imports by name: every project module named by one of its strings is an edge.
        found += [(node.lineno, node.value, "import_module") for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value.split(".")[0] in PACKAGES]
    return found


def _calls_import_module(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
               in ("import_module", "__import__") for node in ast.walk(tree))


def resolve(name: str, how: str, modules: dict) -> str | None:
    """The project module an imported name lands in (None outside the project)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    if how == "from" and name not in modules:
        name = name.rsplit(".", 1)[0]  # ``from a import attribute``: a's own file
    while name and name not in modules:  # ``import a.b.c`` of a name that is not a file: its package
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict:
    """{module: {imported module: first line}} of project-internal imports."""
    modules = project_files()
    graph = {}
    for module, path in modules.items():
        edges = {}
        for line, name, how in imported_names(path, module):
            target = resolve(name, how, modules)
            if target and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(component: list, graph: dict) -> str:
    members = set(component)
    return "; ".join(f"{a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items())
                     if b in members)


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, graph) for c in found)


def test_the_library_s_concern_packages_form_layers():
    """ProbSAMLib's packages and top modules (errors, geometry, metrics, modeling, weights, inference, io, app,
    demo) import each other without a cycle either: one package reaching into another that reaches back is a
    cycle hidden between modules, and the layers (app on top) are how the library is read."""
    def unit(module):
        return ".".join(module.split(".")[:2])

    packages = {}
    for module, edges in import_graph().items():
        if module.startswith("ProbSAMLib."):
            packages.setdefault(unit(module), {}).update(
                {unit(t): line for t, line in edges.items() if t.startswith("ProbSAMLib.") and unit(t) != unit(module)})
    found = cycles(packages)
    assert not found, f"cycles between ProbSAMLib's packages: {found}"


def test_the_library_never_imports_training_or_slicer():
    bad = []
    for module, path in project_files().items():
        if module.split(".")[0] != "ProbSAMLib":
            continue
        for line, name, _ in imported_names(path, module):
            if name.split(".")[0] in FORBIDDEN_IN_LIBRARY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def parses_arguments_at_import(path: Path) -> bool:
    """Whether running the module's top level (not its functions, not ``if __name__ == "__main__":``) parses
    the command line: argparse's parse_* or a read of sys.argv."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_main_guard(node.test):
            todo += node.orelse
            continue
        if isinstance(node, ast.Attribute) and (node.attr in _PARSERS or (
                node.attr == "argv" and isinstance(node.value, ast.Name) and node.value.id == "sys")):
            return True
        todo += list(ast.iter_child_nodes(node))
    return False


def _is_main_guard(test: ast.AST) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def test_no_module_imports_a_script_that_parses_arguments_at_import():
    modules = project_files()
    scripts = {m for m, p in modules.items() if parses_arguments_at_import(p)}
    assert "Training.train" in scripts  # the check sees the one script that works at import
    graph = import_graph()
    bad = [f"{module} -> {target} (line {line})" for module, edges in graph.items()
           for target, line in edges.items() if target in scripts]
    assert not bad, "imports of scripts that parse the command line when imported:\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions_and_by_name(tmp_path):
    """The checker's own reading: a function-level import and an import_module string are edges."""
    source = tmp_path / "probe.py"
    source.write_text("import importlib\n"
                      "def f():\n"
                      "    from ProbSAMLib.weights import registry\n"
                      "    return importlib.import_module('ProbSAMLib.inference.volume')\n", encoding="utf-8")
    names = {name for _, name, _ in imported_names(source, "probe")}
    assert {"ProbSAMLib.weights.registry", "ProbSAMLib.inference.volume"} <= names
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
