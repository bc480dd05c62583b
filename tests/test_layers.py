"""adag's structure: no import cycle, no import from a lower layer to a higher one (the layers are
listed in docs/how-it-works.md), and the size limits (no module over 450 lines, no function over 80).
Imports are read with `ast`, including those inside functions (a lazy import is still a dependency),
those under `if TYPE_CHECKING:` (a cycle there is still two modules that need each other) and the
submodules a package attaches lazily."""

import ast
from pathlib import Path

import adag

PACKAGE = Path(adag.__file__).parent

# Lowest first; a module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("adag", "adag.errors"),
    ("adag.store", "adag.outputs"),
    ("adag.models", "adag.datasets"),
    ("adag.llm",),
    ("adag.view",),
    ("adag.pipeline", "adag.subsets"),
    ("adag.trace",),
    ("adag.cluster",),
    ("adag.describe",),
    ("adag.steer",),
    ("adag.report",),
    ("adag.stages",),
    ("adag.study",),
    ("adag.cli", "adag.__main__"),
]

MODULE_LINES, FUNCTION_LINES = 450, 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# The package root re-exports the public API (`adag.show`, the viewer in a notebook): it stands above
# every layer, while modules that only share its prefix (adag.errors, adag.half_neurons) stay lowest.
FACADE = "adag"


def layer(module: str) -> int:
    if module == FACADE:
        return len(LAYERS)
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer; add it to LAYERS (and to docs/how-it-works.md, Code layers)"
    return max(matches)[1]


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the adag modules it imports (at run time, lazily or for type checking)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                named += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], base]).strip(".")
                named += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "lazy_loader.attach":
                for keyword in node.keywords:
                    if keyword.arg == "submod_attrs":
                        named += [f"{name}.{key}" for key in ast.literal_eval(keyword.value)]
        graph[name] = {target for target in named if target.split(".")[0] == "adag" and target != name}
    return graph


def adag_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def over_limits(paths: dict[str, Path]) -> dict[str, int]:
    """"path" (a module over MODULE_LINES lines) or "path:function" (a function or method over
    FUNCTION_LINES, from its `def` to its last line) -> its length in lines."""
    found = {}
    for shown, path in paths.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MODULE_LINES:
            found[shown] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES:
                    found[f"{shown}:{node.name}"] = length
    return found


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = sorted((source, target) for source, targets in imports(adag_modules()).items() for target in targets
                    if layer(target) > layer(source))
    assert upward == [], "imports from a lower layer to a higher one"


def test_no_import_cycle_even_for_type_checking():
    assert cycles(imports(adag_modules())) == [], "import cycles"


def test_no_module_or_function_over_the_size_limits():
    paths = {path.relative_to(PACKAGE.parent).as_posix(): path for path in sorted(PACKAGE.rglob("*.py"))}
    found = over_limits(paths)
    assert found == {}, f"over the limits: {found}"


def test_the_checks_catch_a_cycle_an_upward_import_and_a_long_function(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    module = tmp_path / "m.py"
    module.write_text("if TYPE_CHECKING:\n    from adag.store import RunDir\n\n\ndef f():\n"
                      + "    x = 1\n" * FUNCTION_LINES + "\n" * (MODULE_LINES - FUNCTION_LINES))
    assert imports({"adag.m": module}) == {"adag.m": {"adag.store"}}  # counted though typing-only
    assert over_limits({"m.py": module}) == {"m.py": MODULE_LINES + 5, "m.py:f": FUNCTION_LINES + 1}
    assert layer("adag.store.writer") < layer("adag.pipeline") < layer("adag.trace.config") < layer("adag.stages")
    assert layer("adag.steer.config") > layer("adag.describe.run") > layer("adag.llm.cache")
