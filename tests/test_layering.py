"""The package imports only downward: no import cycle (counting imports inside functions too), nothing
below the toy world imports it, nothing imports the entry points, and config.py imports only the metric registry."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sail_fast"
ENTRY_POINTS = {"sail_fast.cli", "sail_fast.train", "sail_fast.arguments"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, wherever in the file the import statement is."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _is_package_init(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ re-exporting its own modules is not a cycle of meaning.
    graph = {m: {t for t in ts if not (_is_package_init(t) and m.startswith(t + "."))} for m, ts in graph.items()}
    assert _cycles(graph) == []


def test_nothing_below_imports_the_toy_world_or_the_entry_points():
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if target.startswith("sail_fast.toy") and not module.startswith("sail_fast.toy") and module not in ENTRY_POINTS:
                upward.append(f"{module} -> {target}")
            if target in ENTRY_POINTS and module not in ENTRY_POINTS:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_config_imports_only_the_metric_registry_and_the_yaml_reader():
    # The schema checks sail.ranker_metric against the registry's names (metrics/__init__ imports only .base);
    # yaml_files, a leaf, reads YAML strictly.
    assert import_graph()["sail_fast.config"] <= {"sail_fast.metrics", "sail_fast.yaml_files"}
    assert import_graph()["sail_fast.yaml_files"] == set()
    assert import_graph()["sail_fast.metrics"] <= {"sail_fast.metrics.base"}


def test_no_module_is_over_450_lines_and_the_loop_under_200():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > 450} == {}
    assert sizes["sail/loop.py"] < 200
