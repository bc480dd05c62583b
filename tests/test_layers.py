"""adag's import structure: no cycle, and no import from a lower layer to a higher one (the layers
are listed in README's "How it works"). Imports are read with `ast`, including those inside
functions (a lazy import is still a dependency) and the submodules a package attaches lazily;
imports under `if TYPE_CHECKING:` count for the layers but not for cycles (they never run)."""

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

# Exceptions to the rules, each with its reason; none today.
ALLOWED_UPWARD: set[tuple[str, str]] = set()
ALLOWED_CYCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer; add it to LAYERS (and README's layer list)"
    return max(matches)[1]


def imports(modules: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """module -> {imported adag module: whether the import runs (not only for type checking)}."""
    graph: dict[str, dict[str, bool]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                       for statement in block.body for node in ast.walk(statement)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named: list[tuple[str, bool]] = []
        for node in ast.walk(tree):
            runs = id(node) not in typing_only
            if isinstance(node, ast.Import):
                named += [(alias.name, runs) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], base]).strip(".")
                named += [(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, runs)
                          for alias in node.names]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "lazy_loader.attach":
                for keyword in node.keywords:
                    if keyword.arg == "submod_attrs":
                        named += [(f"{name}.{key}", True) for key in ast.literal_eval(keyword.value)]
        found: dict[str, bool] = {}
        for target, runs in named:
            if target.split(".")[0] == "adag" and target != name:
                found[target] = found.get(target, False) or runs
        graph[name] = found
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


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    modules = adag_modules()
    upward = sorted((source, target) for source, targets in imports(modules).items() for target in targets
                    if layer(target) > layer(source))
    assert set(upward) - ALLOWED_UPWARD == set(), "imports from a lower layer to a higher one"
    assert set(upward) >= ALLOWED_UPWARD, "an allowed exception is gone: remove it from ALLOWED_UPWARD"


def test_no_import_cycle():
    graph = {source: {target for target, runs in targets.items() if runs}
             for source, targets in imports(adag_modules()).items()}
    found = cycles(graph)
    assert [c for c in found if c not in ALLOWED_CYCLES] == [], "import cycles"
    assert all(c in found for c in ALLOWED_CYCLES), "an allowed cycle is gone: remove it from ALLOWED_CYCLES"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert layer("adag.store.writer") < layer("adag.pipeline") < layer("adag.trace.config") < layer("adag.stages")
    assert layer("adag.steer.config") > layer("adag.describe.run") > layer("adag.llm.cache")
