"""Nothing silently wrong, part two: content-checked weights, commands that never replace a user's files,
one-line errors for path and plan mistakes, a clean stop on SIGTERM, and the quieter gaps (issue 27)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sail_fast.build import build_stack
from sail_fast.cli import main
from sail_fast.config import load_config
from sail_fast.dpo.trainer import DPOTrainer
from sail_fast.rundir import LOCK, WeightsChangedError
from sail_fast.sail.loop import SailLoop

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_config  # noqa: E402
from test_train import TINY, planted_pairs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _tiny(tmp_path, *overrides):
    config = load_config(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])
    return config, build_stack(config.model, seed=config.seed, device=torch.device("cpu"))


def zero_tensor_bytes(file: Path) -> None:
    """Zero every byte after the safetensors header, keeping the size (the issue's corruption)."""
    data = bytearray(file.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:] = bytes(len(data) - start)
    file.write_bytes(bytes(data))


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("(run with --debug")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------ 1. content-hashed weights
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A SAIL run with iter0 only, on the tiny stack (seconds)."""
    tmp_path = tmp_path_factory.mktemp("finished")
    SailLoop(make_config(tmp_path, "sail.rounds=0")).run()
    return tmp_path


def test_a_finished_stage_records_the_sha256_of_its_weights(finished_run):
    import hashlib

    final = finished_run / "run/iter0/final"
    recorded = json.loads((final / "manifest.json").read_text())["files"][WEIGHTS]
    assert recorded["sha256"] == hashlib.sha256((final / WEIGHTS).read_bytes()).hexdigest()
    assert recorded["bytes"] == (final / WEIGHTS).stat().st_size


def test_zeroed_final_weights_are_refused_on_resume_and_by_generate_eval_export(tmp_path, finished_run, capsys):
    import shutil

    shutil.copytree(finished_run / "run", tmp_path / "run")
    run, weights = tmp_path / "run", tmp_path / "run/iter0/final" / WEIGHTS
    zero_tensor_bytes(weights)
    with pytest.raises(WeightsChangedError, match=f"{weights} does not match the sha256"):
        SailLoop(make_config(finished_run, "sail.rounds=0", f"output_dir={run}")).run(resume=True)
    assert not (run / LOCK).exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    commands = [["generate", "--checkpoint", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "g")],
                ["export", str(run / "iter0/final/unet"), str(tmp_path / "x")],
                ["eval", "--checkpoint", str(run), "--prompts", str(prompts), "--metrics", "toy_oracle",
                 "--out", str(tmp_path / "e")]]
    for argv in commands:
        with pytest.raises(SystemExit) as code:
            main(argv)
        assert code.value.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{weights} does not match the sha256" in line, argv
    assert not (tmp_path / "g").exists() and not (tmp_path / "x").exists()


def test_truncated_final_weights_are_refused_in_one_line(tmp_path, finished_run, capsys):
    import shutil

    shutil.copytree(finished_run / "run", tmp_path / "run")
    weights = tmp_path / "run/iter0/final" / WEIGHTS
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(SystemExit) as code:
        main(["export", str(tmp_path / "run"), str(tmp_path / "x")])
    assert code.value.code == 2
    assert "truncated or replaced" in one_error_line(capsys.readouterr().err)


def test_a_checkpoint_with_zeroed_weights_is_skipped_on_resume(tmp_path):
    common = ["train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.pairs_per_step=4",
              "train.micro_batch_pairs=4"]
    config, stack = _tiny(tmp_path, *common)
    pairs = planted_pairs(stack, 8, 0)
    DPOTrainer(config, stack.unet, stack.scheduler, pairs).train(stop_after=2)
    zero_tensor_bytes(tmp_path / "run/checkpoints/step-000002" / WEIGHTS)
    config, stack = _tiny(tmp_path, *common)
    DPOTrainer(config, stack.unet, stack.scheduler, pairs).train(resume=True)
    log = (tmp_path / "run/train.log").read_text()
    assert "skipping checkpoint" in log and "does not match the sha256" in log
    assert "step-000001 at step 1" in log
    final = load_file(tmp_path / "run/final" / WEIGHTS)
    assert all(torch.isfinite(t).all() for t in final.values()) and any(t.abs().sum() > 0 for t in final.values())
