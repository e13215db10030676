"""The package's import graph: modules import each other at the top, and no two depend on each other."""

import ast
from pathlib import Path

import jaxlora

PACKAGE = Path(jaxlora.__file__).parent
# The CLI imports the library inside each command, so `jaxlora --help` and argument errors answer before JAX,
# transformers and orbax load.
LAZY_IMPORTERS = {"jaxlora.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(node: ast.AST) -> list[str]:
    """The jaxlora modules an import statement names (a `from P import name` counts name when it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("jaxlora"):
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
        return subs or [node.module]
    return []


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the modules it imports anywhere in its body; and every import made inside a function."""
    graph, nested = {}, []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = set()
        for node in ast.walk(tree):
            for target in imported_modules(node):
                graph[name].add(target)
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                nested += [f"{name} imports {t} inside {function.name}()" for t in imported_modules(node)]
    return graph, nested


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package's __init__ importing its own children is not
    a cycle: Python runs it before any of them."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target == module or module.startswith(target + "."):
                continue  # a module importing its own package (its parent __init__) runs that first anyway
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if state.get(target) is None and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if state.get(module) is None and (found := visit(module)):
            return found
    return None


def test_the_graph_walker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 30 and graph["jaxlora.generate"], "the walker found too little to be checking anything"
    assert find_cycle(graph) is None


def test_library_modules_import_each_other_at_the_top():
    _, nested = import_graph()
    assert [n for n in nested if n.split()[0] not in LAZY_IMPORTERS] == []


def test_importing_the_package_loads_no_heavy_library_until_a_name_is_used():
    """`import jaxlora` (and so the CLI's argument errors) costs no JAX/transformers/orbax start-up; the first use
    of a public name loads its module."""
    import subprocess
    import sys

    code = (
        "import sys, jaxlora\n"
        "heavy = [m for m in ('jax', 'transformers', 'orbax', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(jaxlora.forward) and 'jax' in sys.modules\n"
        "assert set(jaxlora.__all__) <= set(dir(jaxlora)) and callable(jaxlora.decoding.prefill)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_functions_named_like_their_module_stay_functions():
    """`jaxlora.generate` and `jaxlora.convert` are functions even after their modules are imported directly."""
    import subprocess
    import sys

    code = (
        "from jaxlora.generate import make_plan\n"
        "from jaxlora.convert import default_dst\n"
        "import jaxlora, types\n"
        "assert callable(jaxlora.generate) and not isinstance(jaxlora.generate, types.ModuleType)\n"
        "assert callable(jaxlora.convert) and not isinstance(jaxlora.convert, types.ModuleType)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
