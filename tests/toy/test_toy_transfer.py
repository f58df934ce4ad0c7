"""`sail-fast toy transfer`: a finished experiment's stages sampled again under another sampler,
judged by the run's own human, paired the same way as the experiment's table."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sail_fast.runs.config import load_config
from sail_fast.runs.layout import EVAL_SAMPLES
from sail_fast.toy.studies.sampler_transfer import sampler_transfer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A one-seed experiment folder: SAIL (iter0 and one round) under the `bold` human."""
    from sail_fast.commands.train import run_sail

    out = tmp_path_factory.mktemp("experiment")
    seed_dir = out / "seed-0"
    run_sail(
        load_config(
            REPO / "configs/toy-quick.yaml",
            [
                f"output_dir={seed_dir / 'sail'}",
                f"toy.data_dir={seed_dir / 'human'}",
                "sail.rounds=1",
                "sail.prompts_per_round=4",
                "toy.labelled_pairs=16",
                "toy.heldout_pairs=6",
                "sail.eval_prompts=3",
                "train.steps=2",
                "train.progress=false",
                f"toy.preference={REPO / 'configs/preferences/strokes.py'}:bold",
            ],
        )
    )
    return out


@pytest.mark.slow
def test_the_runs_own_sampler_reproduces_its_evaluation(experiment):
    # Same sampler, steps and images as the run: the same seeds give the same samples and the same judged
    # scores, so the transfer samples what the run sampled and judges by the run's human (bold, not built-in).
    table = sampler_transfer(experiment, [0], ["sail"], sampler="ddim", steps=5, trust_code=True)
    assert table.name == "results-ddim-5.md"
    for stage in ("base", "iter0", "round-01"):
        first = load_file(experiment / "seed-0/sail" / stage / EVAL_SAMPLES)
        again = load_file(experiment / "seed-0/sail/ddim-5" / stage / EVAL_SAMPLES)
        torch.testing.assert_close(again["latents"], first["latents"])
        torch.testing.assert_close(again["score"], first["score"])
    lines = [line.split("|")[1].strip() for line in table.read_text().splitlines()[2:]]
    assert lines == ["base model", "SAIL iter0 (seed only)", "SAIL round 1"]


@pytest.mark.slow
def test_another_sampler_draws_new_samples_paired_across_stages(experiment):
    table = sampler_transfer(
        experiment, [0], ["sail", "dpo-6"], sampler="ddpm", steps=3, images_per_prompt=1, trust_code=True
    )
    variant = experiment / "seed-0/sail/ddpm-3"
    base = load_file(variant / "base" / EVAL_SAMPLES)
    assert base["latents"].shape[:2] == (3, 1)  # 3 eval prompts x 1 image
    assert not torch.allclose(
        base["latents"], load_file(experiment / "seed-0/sail/base" / EVAL_SAMPLES)["latents"][:, :1]
    )
    rows = {r["model"]: r for r in json.loads(table.with_suffix(".json").read_text())}
    round1 = load_file(variant / "round-01" / EVAL_SAMPLES)["score"]
    assert rows["SAIL round 1"]["vs_base"]["score"][0] == pytest.approx(
        float((round1 - base["score"]).mean()), abs=1e-6
    )
    assert "Diffusion-DPO, 6% of labels" not in rows  # no dpo-6 run in this folder: skipped, not invented
    # The label-quality diagnostic is the loop's own evaluation's, not the transfer's.
    assert "label_accuracy" in json.loads((experiment / "seed-0/sail/round-01/eval.json").read_text())
    assert "label_accuracy" not in json.loads((variant / "round-01/eval.json").read_text())
    # A second call finds every stage evaluated and samples nothing.
    stamp = (variant / "round-01/eval.json").stat().st_mtime_ns
    sampler_transfer(experiment, [0], ["sail"], sampler="ddpm", steps=3, images_per_prompt=1, trust_code=True)
    assert (variant / "round-01/eval.json").stat().st_mtime_ns == stamp


def test_compile_and_batch_size_reach_the_runs_settings(tmp_path, monkeypatch):
    from sail_fast.toy.studies import sampler_transfer as transfer

    run = tmp_path / "seed-0/sail"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    seen = []
    monkeypatch.setattr(
        transfer, "evaluate_run_under", lambda run, variant, overrides, log, **kw: seen.append(overrides) or 1
    )
    monkeypatch.setattr(transfer, "write_table", lambda out, seeds, rounds, variant: out / f"results-{variant}.md")
    transfer.sampler_transfer(tmp_path, [0], ["sail"], batch_size=50, compile=True)
    transfer.sampler_transfer(tmp_path, [0], ["sail"])
    assert {"sail.sampler=ddpm", "sail.generation_batch=50", "sail.compile=true"} <= set(seen[0])
    assert not any(o.startswith(("sail.compile", "sail.generation_batch")) for o in seen[1])
