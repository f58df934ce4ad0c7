"""The one-run GPU check rehearses on the CPU, so it cannot rot between the sessions that have a GPU."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_summary_with_the_cuda_steps_skipped(tmp_path):
    done = subprocess.run(
        ["bash", str(REPO / "bench/gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    cuda_steps = [n for n in status if not n.startswith("rehearsal")]
    assert len(cuda_steps) == 5 and all(status[n] == "skipped" for n in cuda_steps)
    assert [status[n] for n in status if n.startswith("rehearsal")] == ["passed", "passed"]
    bench = next(s for s in summary["steps"] if s.get("benchmarks"))
    assert {b["name"] for b in bench["benchmarks"]} >= {"lora-one-unet", "lora-two-unets"}
    plan = next(s for s in summary["steps"] if s.get("result"))["result"]
    assert [r["trains"] for r in plan] == ["UNet", "LoRA r8"] and all(r["measured_gib"] > 0 for r in plan)
    markdown = (tmp_path / "summary.md").read_text()
    assert "skipped (no CUDA device)" in markdown and "| LoRA r8 |" in markdown
