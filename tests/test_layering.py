"""The package imports only downward: no import cycle (counting imports inside functions too), nothing
below the toy world imports it, nothing imports the entry points, and config.py imports only the metric registry."""

import ast
import re
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


# The entry points and the loop read the whole config; every part below them gets its own section and plain
# arguments. toy/experiment drives `toy experiment` and `toy calibrate` (a loop per condition and seed).
WHOLE_CONFIG_READERS = ENTRY_POINTS | {"sail_fast.config", "sail_fast.sail.loop", "sail_fast.sail.context",
                                       "sail_fast.toy.experiment"}


def whole_config_parameters(tree: ast.AST) -> list[str]:
    """Parameters of functions and methods that are annotated RunConfig, or are named ``config`` unannotated."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            for arg in params:
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else None
                if (annotation and "RunConfig" in annotation) or (annotation is None and arg.arg == "config"):
                    found.append(f"{node.name}({arg.arg}: {annotation})")
    return found


def test_the_signature_check_finds_whole_config_parameters():
    tree = ast.parse("class T:\n    def __init__(self, config: RunConfig, x: int): ...\n"
                     "def f(config): ...\ndef g(config: dict, train: TrainConfig): ...")
    assert sorted(whole_config_parameters(tree)) == ["__init__(config: RunConfig)", "f(config: None)"]


def test_only_the_entry_points_and_the_loop_take_a_run_config():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module not in WHOLE_CONFIG_READERS and (found := whole_config_parameters(ast.parse(path.read_text()))):
            offenders[module] = found
    assert offenders == {}


# Stage paths and file names of a run folder: only sail_fast/run_layout.py spells them. `sail-fast eval`
# writes its own output folder (eval.json, with a "checkpoints" list), not a run's.
RUN_PATH_NAMES = {"iter0", "final", "checkpoints", "eval.json", "eval_samples.safetensors", "ranking.json", "done.json",
                  "pairs.safetensors", "candidates.png", "real_pairs.png", "samples.png", "metrics.json", "metrics.jsonl",
                  "curves.png", "summary.md", "compare.png", "train.log", "sail.log", "config.yaml"}
RUN_PATH_PREFIX = re.compile(r"^(round-|iter0/|final/|checkpoints/|step-|candidates\.rank|real_losers\.rank|metrics\.rank|config\.resume)\S*$")
OWN_OUTPUT = {"sail_fast.evaluate", "sail_fast.cli"}


def run_path_literals(tree: ast.AST) -> list[str]:
    """String constants (docstrings aside) that name a run folder's stage, file or subfolder."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [f"line {node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and (node.value in RUN_PATH_NAMES or RUN_PATH_PREFIX.match(node.value))]


def test_the_path_check_finds_stage_paths_but_not_prose():
    tree = ast.parse('"""Writes round-01/ranking.json."""\n'
                     'a = out / f"round-{r:02d}" / "ranking.json"\nb = run / "iter0/final"\n'
                     'raise ValueError(f"no iter0/final in {run}; let it finish")')
    assert sorted(run_path_literals(tree)) == ["line 2: 'ranking.json'", "line 2: 'round-'", "line 3: 'iter0/final'"]


def test_every_run_path_comes_from_the_run_layout():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module not in {"sail_fast.run_layout"} | OWN_OUTPUT and (literals := run_path_literals(ast.parse(path.read_text()))):
            found[module] = literals
    assert found == {}
