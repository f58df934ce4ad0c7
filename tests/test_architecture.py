"""The claims of docs/architecture.md, checked: the package imports only downward (no import cycle, counting
imports inside functions too), nothing below the toy world imports it, nothing below the commands imports them,
runs/config.py imports only the metric registry, no function grows past a screen, only the commands, the loop
and the toy's studies read a whole config, and only runs/layout.py spells a run folder's paths."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sail_fast"


def _is_entry_point(module: str) -> bool:
    """The commands (the CLI and each command's work) and the file deepspeed launches."""
    return module == "sail_fast.train" or module.startswith("sail_fast.commands")


def _is_driver(module: str) -> bool:
    """What may read a whole config: the entry points, the config itself, the loop, the toy's studies (each runs
    loops of its own) and the DPO trainer's one builder; run_folder reads a run's recorded config for the commands."""
    return (
        _is_entry_point(module)
        or module.startswith("sail_fast.toy.studies")
        or module
        in {"sail_fast.runs.config", "sail_fast.runs.run_folder", "sail_fast.sail.loop", "sail_fast.dpo.builder"}
    )


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
            if (
                target.startswith("sail_fast.toy")
                and not module.startswith("sail_fast.toy")
                and not _is_entry_point(module)
            ):
                upward.append(f"{module} -> {target}")
            if _is_entry_point(target) and not _is_entry_point(module):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_config_imports_only_the_metric_registry_and_the_yaml_reader():
    # The schema checks sail.ranker_metric against the registry's names (metrics/__init__ imports only .base);
    # yaml_files, a leaf, reads YAML strictly.
    assert import_graph()["sail_fast.runs.config"] <= {"sail_fast.metrics", "sail_fast.runs.yaml_files"}
    assert import_graph()["sail_fast.runs.yaml_files"] == set()
    assert import_graph()["sail_fast.metrics"] <= {"sail_fast.metrics.base"}


# A function does one job: at most 60 statements (as ruff's PLR0915 counts them, so the bound does not move
# when the formatter wraps lines), branches bounded by ruff's C901 in CI. The CLI's parser builder is one
# declarative list of options per command.
FUNCTION_STATEMENTS = 60
LONG_ON_PURPOSE = {"sail_fast.commands.cli:build_parser"}


def _statements(function: ast.AST) -> int:
    """Statements in a function's body, nested blocks included, nested functions and classes not."""
    count, todo = 0, list(function.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        count += 1
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            todo += [
                n for n in getattr(node, field, []) if isinstance(n, (ast.stmt, ast.excepthandler, ast.match_case))
            ]
    return count


def long_functions() -> list[str]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name, size = f"{_module_name(path)}:{node.name}", _statements(node)
                if size > FUNCTION_STATEMENTS and name not in LONG_ON_PURPOSE:
                    found.append(f"{name} ({size} statements)")
    return found


def test_the_size_check_counts_statements_not_lines():
    one = ast.parse("def f(x):\n    y = g(\n        x,\n    )\n    if y:\n        return 1\n    return 2\n").body[0]
    assert _statements(one) == 4


def test_no_function_has_more_than_60_statements():
    assert long_functions() == []


def test_every_module_lives_in_a_folder_that_names_its_role():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "train.py"]  # train.py: the thin file deepspeed launches
    roles = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert roles == {"commands", "data", "diffusion", "dpo", "metrics", "reward", "runs", "sail", "toy"}


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
    tree = ast.parse(
        "class T:\n    def __init__(self, config: RunConfig, x: int): ...\n"
        "def f(config): ...\ndef g(config: dict, train: TrainConfig): ..."
    )
    assert sorted(whole_config_parameters(tree)) == ["__init__(config: RunConfig)", "f(config: None)"]


def test_only_the_drivers_take_a_run_config():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if not _is_driver(module) and (found := whole_config_parameters(ast.parse(path.read_text()))):
            offenders[module] = found
    assert offenders == {}


SECTIONS = {"model", "data", "train", "sail", "toy", "seed", "output_dir"}  # RunConfig's fields
CONFIG_LOADERS = {"load_config", "load_recorded_config", "round_config"}


def whole_config_reads(tree: ast.AST) -> list[str]:
    """``<x>.config.<section>`` reads (a whole config carried in an object) and calls that load a whole config."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in SECTIONS
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "config"
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in CONFIG_LOADERS:
                found.append(f"line {node.lineno}: {name}(...)")
    return found


def test_the_read_check_finds_config_attribute_reads_and_loads():
    tree = ast.parse("b = ctx.config.train.beta\nc = load_recorded_config(run)\nd = unet.config.in_channels\n")
    assert sorted(whole_config_reads(tree)) == ["line 1: ctx.config.train", "line 2: load_recorded_config(...)"]


def test_only_the_drivers_read_or_load_a_whole_config():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if not _is_driver(module) and (found := whole_config_reads(ast.parse(path.read_text()))):
            offenders[module] = found
    assert offenders == {}


# Stage paths and file names of a run folder: only sail_fast/runs/layout.py spells them. `sail-fast eval`
# writes its own output folder (eval.json, with a "checkpoints" list), not a run's.
RUN_PATH_NAMES = {
    "iter0",
    "final",
    "checkpoints",
    "eval.json",
    "eval_samples.safetensors",
    "ranking.json",
    "done.json",
    "pairs.safetensors",
    "candidates.png",
    "real_pairs.png",
    "samples.png",
    "metrics.json",
    "metrics.jsonl",
    "curves.png",
    "summary.md",
    "chosen.json",
    "compare.png",
    "train.log",
    "sail.log",
    "config.yaml",
    "run.json",
    "all.jsonl",
    "seed.jsonl",
    "heldout.jsonl",
    "summary.json",
    "real-digits",
}
RUN_PATH_PREFIX = re.compile(
    r"^(round-|iter0/|final/|checkpoints/|step-|candidates\.rank|real_losers\.rank|metrics\.rank|config\.resume)\S*$"
)
OWN_OUTPUT = {"sail_fast.commands.evaluate", "sail_fast.commands.cli"}


def run_path_literals(tree: ast.AST) -> list[str]:
    """String constants (docstrings aside) that name a run folder's stage, file or subfolder."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"line {node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and (node.value in RUN_PATH_NAMES or RUN_PATH_PREFIX.match(node.value))
    ]


def test_the_path_check_finds_stage_paths_but_not_prose():
    tree = ast.parse(
        '"""Writes round-01/ranking.json."""\n'
        'a = out / f"round-{r:02d}" / "ranking.json"\nb = run / "iter0/final"\n'
        'raise ValueError(f"no iter0/final in {run}; let it finish")'
    )
    assert sorted(run_path_literals(tree)) == ["line 2: 'ranking.json'", "line 2: 'round-'", "line 3: 'iter0/final'"]


def test_every_run_path_comes_from_the_run_layout():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module not in {"sail_fast.runs.layout"} | OWN_OUTPUT and (
            literals := run_path_literals(ast.parse(path.read_text()))
        ):
            found[module] = literals
    assert found == {}
