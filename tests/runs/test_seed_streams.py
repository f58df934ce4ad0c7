"""Every seed stream has a name in sail_fast/runs/seeding.py: no integer literal is passed to derive_seed (or to
the helpers that forward to it) anywhere else, and the named values are the ones runs have always drawn with."""

import ast
from pathlib import Path

from sail_fast.runs import seeding

PACKAGE = Path(__file__).resolve().parents[2] / "sail_fast"
SEEDING_CALLS = {"derive_seed", "generator", "_rng", "_bank"}  # _rng, _bank: the reward audit's, onto derive_seed

# What each stream was before it had a name: changing one changes every run's draws.
STREAMS = {
    "STAGE_TRAINING": 100,
    "TOY_PROMPT_SPLIT": 7001,
    "TOY_CLASSIFIER_SPLIT": 7002,
    "TOY_CLASSIFIER_INIT": 7003,
    "TOY_PRETRAIN_BATCHES": 7004,
    "TOY_LABEL_SAMPLES": 7010,
    "TOY_LABEL_CHOICES": 7011,
    "TOY_REAL_DIGITS": 7020,
    "TOY_ROUND_PROMPTS": 8001,
    "ROUND_CANDIDATES": 8100,
    "ROUND_RANKING_DRAWS": 8200,
    "ROUND_RANDOM_PAIRS": 8300,
    "ROUND_REAL_LOSERS": 8400,
    "ROUND_REAL_MASKS": 8500,
    "AUDIT_CANDIDATES": 8800,
    "AUDIT_DRAW_BANK": 8801,
    "AUDIT_HELDOUT_BANK": 8802,
    "AUDIT_SUBSETS": 8850,
    "AUDIT_HELDOUT_SUBSETS": 8860,
    "EVAL_SAMPLE_SEEDS": 9000,
    "EVAL_AGREEMENT_DRAWS": 9001,
    "EVAL_LABEL_QUALITY_DRAWS": 9002,
    "ROUND_SCORE_HELDOUT": 9003,
    "ROUND_SCORE_CONSISTENCY": 9004,
    "HELDOUT_SPLIT": 9005,
}


def _int_literals(arg: ast.expr) -> list[int]:
    """Integers an argument adds up from (``8100 + r``), not ones inside an index or a call (``shape[2:]``)."""
    if isinstance(arg, ast.Constant) and type(arg.value) is int:
        return [arg.value]
    if isinstance(arg, ast.BinOp):
        return _int_literals(arg.left) + _int_literals(arg.right)
    return []


def _name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def test_no_literal_seed_stream_outside_seeding():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "seeding.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _name(node.func) in SEEDING_CALLS:
                literals = [v for arg in node.args for v in _int_literals(arg)]
                if literals:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {_name(node.func)}(... {literals} ...)")
    assert found == []


def test_the_named_streams_keep_their_values_and_are_distinct():
    named = {k: v for k, v in vars(seeding).items() if k.isupper() and type(v) is int}
    assert named == STREAMS
    assert len(set(named.values())) == len(named)
