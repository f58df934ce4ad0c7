"""`sail-fast run` on the toy world's quick profile, then `sail-fast generate` from the run."""

import json
import subprocess
from pathlib import Path

from PIL import Image
from test_entry_points import assert_quiet

REPO = Path(__file__).resolve().parents[2]


def sail_fast(*args, cwd):
    done = subprocess.run(["sail-fast", *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_quiet(done.stdout + done.stderr)  # no third-party line a user cannot act on
    return done


def test_toy_quick_profile_runs_end_to_end_and_generates(tmp_path):
    run = tmp_path / "run"
    first = sail_fast(
        "run", "--config", str(REPO / "configs/toy-quick.yaml"), "--set", f"output_dir={run}", cwd=tmp_path
    )
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["stage"] for r in rows] == ["base", "iter0", "round-01", "round-02"]
    for row in rows:
        assert 0.0 <= row["digit_accuracy"] <= 1.0 and row["oracle_score"] < 2.0
    summary = json.loads((run / "human/summary.json").read_text())
    assert (summary["labelled"], summary["seed"], summary["heldout"]) == (64, 16, 16)
    assert len((run / "human/seed.jsonl").read_text().splitlines()) == 16
    for picture in ("curves.png", "round-01/candidates.png", "base/samples.png", "compare.png"):
        assert Image.open(run / picture).size[0] > 0
    # The run ends with its table: every stage, with the paired change from the base.
    # summary.md: the round score the run sees, the stage it keeps, then the judged table.
    score, judged = (run / "summary.md").read_text().split("## Judged by the world")
    for table in (score, judged):
        stages = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
        assert [s.replace("**", "").removesuffix(" (kept)") for s in stages] == [
            "base",
            "iter0",
            "round-01",
            "round-02",
        ]
    kept = json.loads((run / "chosen.json").read_text())["stage"]
    assert f"Kept: **{kept}** by sail.select: guarded" in score and f"| **{kept}** (kept) |" in score
    assert "| round-02 |" in first.stdout + first.stderr
    assert rows[-1]["vs_base"]["score"][1] > 0  # a paired standard error, from the per-sample tables

    # A second run with --resume finds every stage finished and only re-reads.
    again = sail_fast(
        "run", "--config", str(REPO / "configs/toy-quick.yaml"), "--set", f"output_dir={run}", "--resume", cwd=tmp_path
    )
    assert "Diffusion-DPO on" not in again.stdout + again.stderr

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 3\nthe digit seven\n")
    out = tmp_path / "pictures"
    sail_fast(
        "generate",
        "--checkpoint",
        str(run),
        "--prompts",
        str(prompts),
        "--num-images",
        "3",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{p:04d}-{n:02d}.png" for p in range(2) for n in range(3)]
    assert Image.open(out / "0000-00.png").size == (16, 16)
    record = json.loads((out / "prompts.json").read_text())
    assert record["prompts"] == ["a handwritten 3", "the digit seven"] and record["sampling"]["sampler"] == "ddim"
