"""The package's own structure: its modules import each other without a cycle (also none hidden in
a function body), and the NumPy API and the guards load without torch."""

import ast
import pathlib
import subprocess
import sys

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


def test_numpy_api_and_guards_load_without_torch():
    code = "import sys, lse, lse.guard; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
