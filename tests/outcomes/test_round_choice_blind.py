"""The round score never reads the judge: a toy run whose judge answers with noise after the labelling records
the same round score, stops at the same round and keeps the same stage as the run with the real judge."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from sail_fast.runs.config import load_config
from sail_fast.runs.layout import RunLayout
from sail_fast.sail.evaluation import metric_rows
from sail_fast.sail.loop import SailLoop
from sail_fast.sail.round_score import SCORE_KEYS
from sail_fast.sail.selection import BY_PROMPT, CHOICE_BY_PROMPT, HELDOUT_PAIRS
from sail_fast.toy.run import ToyWorld
from sail_fast.toy.studies.consistency_backfill import backfill_consistency, with_backfill

REPO = Path(__file__).resolve().parents[2]


def run_toy(tmp_path: Path, name: str) -> Path:
    overrides = [f"output_dir={tmp_path / name}", f"toy.data_dir={tmp_path / 'human'}", "sail.early_stop=true"]
    SailLoop(load_config(REPO / "configs/toy-quick.yaml", overrides)).run()
    return tmp_path / name


def test_the_kept_stage_and_the_round_score_do_not_depend_on_the_judge(tmp_path, monkeypatch):
    seen = run_toy(tmp_path, "judged")
    judge = ToyWorld.judge
    generator = torch.Generator().manual_seed(1)

    def noise(self, latents, prompts):  # the judge's tables, every value replaced by noise
        return {k: torch.rand(v.shape, generator=generator) for k, v in judge(self, latents, prompts).items()}

    monkeypatch.setattr(ToyWorld, "judge", noise)
    blind = run_toy(tmp_path, "blind")

    rows = [json.loads((run / "metrics.json").read_text()) for run in (seen, blind)]
    assert [r["oracle_score"] for r in rows[0]] != [r["oracle_score"] for r in rows[1]]  # the judge did change
    scores = [[{k: r[k] for k in SCORE_KEYS + ("stage",)} for r in run_rows] for run_rows in rows]
    assert scores[0] == scores[1]
    chosen = [json.loads((run / "chosen.json").read_text()) for run in (seen, blind)]
    assert chosen[0] == chosen[1]

    # A run evaluated before eval.json held the per-prompt scores and the held-out pair count: `toy consistency`
    # measures them again from the stored samples and the base, and gets the values the evaluation recorded; a
    # second call writes nothing.
    older = RunLayout(tmp_path / "older")
    shutil.copytree(seen, older.root)
    recorded = {}
    for stage in older.evaluated_stages():
        record = json.loads(older.eval_json(stage).read_text())
        recorded[stage] = {key: record.pop(key) for key in (BY_PROMPT, CHOICE_BY_PROMPT, HELDOUT_PAIRS)}
        older.eval_json(stage).write_text(json.dumps(record))
    assert len(recorded) >= 3 and all(
        len(v[BY_PROMPT]) == len(recorded["base"][BY_PROMPT]) > 1 for v in recorded.values()
    )
    assert backfill_consistency(older.root) == list(recorded) and backfill_consistency(older.root) == []
    rows = with_backfill(older, metric_rows(older, rounds=8))
    assert [row["stage"] for row in rows] == list(recorded)
    for row in rows:
        want = recorded[row["stage"]]
        assert row[BY_PROMPT] == pytest.approx(want[BY_PROMPT], abs=1e-9)
        assert row[CHOICE_BY_PROMPT] == want[CHOICE_BY_PROMPT]  # shares of the same samples: exact
        assert row[HELDOUT_PAIRS] == want[HELDOUT_PAIRS] > 0
