"""The package's own structure: its modules import each other without a cycle (also none hidden in
a function body), and the NumPy API and the guards load without torch."""

import ast
import pathlib

import lse

PACKAGE = pathlib.Path(lse.__file__).parent


def _imports_within_package() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports, anywhere in its body."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        module = path.stem
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:  # from .x import y
                    graph[module].add(node.module.split(".")[0])
                else:  # from . import x, y
                    graph[module].update(alias.name for alias in node.names)
    return graph


def test_module_imports_form_no_cycle():
    graph = _imports_within_package()
    assert {"_numpy", "guard", "torch", "_arrays"} <= set(graph)  # the walk saw the modules
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [module, dep]))
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def _module_level_imports(module: str) -> set[str]:
    """What ``module`` imports when it loads (its top-level statements, not function bodies):
    package modules by their name, anything else by its top-level package."""
    names = set()
    for node in ast.parse((PACKAGE / f"{module}.py").read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level == 1:
                names.update(alias.name for alias in node.names)
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


def test_numpy_api_and_guards_load_without_torch():
    # Every module that `import lse` and `import lse.guard` load, followed from __init__ through
    # module-level imports: none of them imports torch (statically, so that it also holds where
    # no second interpreter can be started, as under qemu).
    graph = _imports_within_package()
    loaded, todo = set(), ["__init__", "guard"]
    while todo:
        module = todo.pop()
        if module in loaded:
            continue
        loaded.add(module)
        todo.extend(m for m in _module_level_imports(module) if m in graph)
    assert {"_numpy", "guard", "_stats", "_arrays"} <= loaded
    assert "torch" not in loaded
    importers = sorted(m for m in loaded if "torch" in _module_level_imports(m))
    assert importers == [], f"importing lse loads torch through {importers}"
