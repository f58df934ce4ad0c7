"""The seed papers' losses and labels run end to end in a toy SAIL run, one per stage: DMPO trains iter0,
DSPO with SDPO's winner-preserving scale trains round 1, SmPO with min-max soft labels trains round 2.
Each stage's first step is checked against its formula at the point where policy equals reference."""

import json
import math
from pathlib import Path

import pytest
import torch

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.runs.config import load_config
from sail_fast.sail.ranking import soft_labels

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dmpo_dspo_with_winner_preserving_and_minmax_smpo_in_a_toy_run(tmp_path):
    from sail_fast.commands.train import run_sail

    config = load_config(
        REPO / "configs/toy-quick.yaml",
        [
            f"output_dir={tmp_path}",
            "train.loss=dmpo",
            "train.dmpo_alpha=0.01",
            "sail.eval_each_round=false",
            # every round starts where policy equals reference, so each loss's first step has a closed form
            "sail.training_reference=round_start",
            "sail.round_overrides={1: [train.loss=dspo, train.beta=0.001, train.winner_preserving_mu=0.5], "
            "2: [train.loss=smpo, sail.soft_labels=true, sail.soft_label_norm=minmax, 'sail.soft_label_range=[-50, 50]']}",
        ],
    )
    run_sail(config)

    def steps(stage):
        return [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]

    # DMPO at u = 0: KL(Bern(1/2) || Bern(0.99))
    q = 0.99
    first = steps("iter0")[0]
    assert first["logit"] == 0.0
    assert first["loss"] == pytest.approx(0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)), rel=1e-6)
    # DSPO where policy = reference: the winner's plain denoising loss; SDPO's lambda in [0, 1] every step
    dspo = steps("round-01/train")
    assert dspo[0]["loss"] == pytest.approx(dspo[0]["mse_policy_win"], rel=1e-5)
    assert all(0.0 <= s["loser_grad_scale"] <= 1.0 for s in dspo)
    assert all(math.isfinite(s["loss"]) for s in dspo)
    # SmPO: min-max soft labels of the implicit rewards, and ln 2 at the first step whatever the labels
    ranking = json.loads((tmp_path / "round-02/ranking.json").read_text())
    assert ranking["label_norm"] == "minmax"
    rewards = torch.tensor(ranking["rewards"])
    pairs = LatentPairs.load(tmp_path / "round-02/pairs.safetensors")
    want = soft_labels(rewards, rewards.argmax(1), rewards.argmin(1), norm="minmax", score_range=(-50.0, 50.0))
    torch.testing.assert_close(pairs.label, want)
    assert (pairs.label > 0.5).all() and (pairs.label < 1).all()
    assert steps("round-02/train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "round-02/train/final/unet").is_dir()
