"""The package's layout rules, read from the source (no import needed):

* no import circle among minimoe's modules, counting every import -- at the top of a module
  and inside functions alike (a lazy import hides a circle from Python, not from a reader),
  except those under ``if TYPE_CHECKING:``; importing ``minimoe.a.b`` also runs the package
  ``minimoe.a``'s ``__init__``, so that counts as an edge too, from modules outside that
  package (the top-level ``minimoe`` facade, which every module's import passes through, only
  when a module imports it itself: ``import minimoe`` or ``from minimoe import ModelConfig``);
* kernels/ (imported as ``minimoe.kernels``) depends on torch and triton only: it imports
  nothing from the minimoe reference (its tests and benchmarks bring the reference in);
* outside the Triton kernels, no function is longer than 80 lines (a reader follows it).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80


def _module_files() -> dict[str, pathlib.Path]:
    """{dotted module name: file} for minimoe/ and kernels/ (as minimoe.kernels)."""
    modules = {}
    for base, package in ((ROOT / "minimoe", "minimoe"), (ROOT / "kernels", "minimoe.kernels")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, (ast.Name, ast.Attribute))
            and "TYPE_CHECKING" in ast.unparse(node.test))


def _imports(path: pathlib.Path, module: str, known: set[str]) -> set[str]:
    """The minimoe modules ``module`` imports anywhere in its file (see the module docstring)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
               for n in ast.walk(block)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from minimoe.x import y": the module minimoe.x.y if there is one, else minimoe.x
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
            name = name.rpartition(".")[0]
            while "." in name:  # the packages above it, up to (not including) the facade
                # a module inside that package is imported by it (or its __init__ is running)
                if name != module and not module.startswith(name + "."):
                    found.add(name)
                name = name.rpartition(".")[0]
    return found


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    known = set(files)
    return {module: _imports(path, module, known) for module, path in files.items()}


def _find_cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_a_circle():
    # the checker itself: a two-module circle through a lazy import is found
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    graph = _graph()
    assert "minimoe.model" in graph["minimoe.checkpoints.load"]  # a top-level import
    assert "minimoe.checkpoints.families" in graph["minimoe.config"]  # a lazy one


def test_no_import_circle_in_minimoe():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_kernels_import_nothing_from_the_reference():
    graph = _graph()
    offenders = {module: sorted(d for d in deps if not d.startswith("minimoe.kernels"))
                 for module, deps in graph.items() if module.startswith("minimoe.kernels")}
    offenders = {m: d for m, d in offenders.items() if d}
    assert not offenders, f"kernels/ imports the minimoe reference: {offenders}"


def test_no_function_longer_than_a_reader_follows():
    long = []
    for module, path in _module_files().items():
        if module.startswith("minimoe.kernels"):
            continue  # Triton kernels are exempt (one kernel body is one launch)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
