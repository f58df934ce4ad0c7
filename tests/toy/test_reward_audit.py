"""Self-label quality in every toy round (ranking.json, eval.json, summary.md) and `sail-fast toy reward-audit`,
on one tiny toy run."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sail_fast.runs.config import load_config
from sail_fast.sail.label_quality import label_quality, within_prompt_spearman
from sail_fast.toy.human import ToyOracle
from sail_fast.toy.labels import oracle_samples
from sail_fast.toy.studies.estimator_choice import apply_selection_rule
from sail_fast.toy.studies.reward_audit import PolicyAudit, reward_audit, rowwise_spearman

REPO = Path(__file__).resolve().parents[2]
QUALITY = (
    "label_accuracy",
    "label_gap_share",
    "reward_human_spearman",
    "reward_width_spearman",
    "reward_log_prob_spearman",
)


def test_label_quality_formulas():
    score = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    rewards = torch.tensor([[0.3, 0.1, 0.2], [0.3, 0.2, 0.1]])  # right on prompt 0, reversed on prompt 1
    judged = {"score": score, "width": -score, "correct": torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])}
    q = label_quality(judged, rewards, rewards.argmax(1), rewards.argmin(1), ("width",))
    assert q["label_accuracy"] == 0.5 and q["label_gap_share"] == 0.0  # gaps +2 and -2 against the human's own 2 and 2
    assert q["reward_human_spearman"] == pytest.approx(0.0) and q["reward_width_spearman"] == pytest.approx(0.0)
    assert (q["best_wrong_digit"], q["worst_wrong_digit"]) == (1, 0)
    q = label_quality(judged, score.clone(), score.argmax(1), score.argmin(1), ("width",))
    assert (q["label_accuracy"], q["label_gap_share"], q["reward_human_spearman"], q["reward_width_spearman"]) == (
        1.0,
        1.0,
        1.0,
        -1.0,
    )
    # Ties share their mean rank; constant rows are left out.
    assert within_prompt_spearman(
        torch.tensor([[1.0, 1.0, 2.0], [5.0, 5.0, 5.0]]), torch.tensor([[1.0, 2.0, 3.0]] * 2)
    ) == pytest.approx(0.8660254)
    assert np.isnan(rowwise_spearman(np.ones((1, 3)), np.arange(3.0)[None]))[0]


def test_policy_audit_on_a_planted_bank():
    """A bank where low-t draws rank by the human and high-t draws by (negative) width: the low band
    agrees with the human, the high band with thin strokes, and every K's cost is 2 N K forwards."""
    gen = torch.Generator().manual_seed(0)
    p, n, d = 30, 6, 40
    score, width = torch.randn(p, n, generator=gen), torch.randn(p, n, generator=gen)
    t = torch.arange(d).repeat(p, 1) * 25  # 0, 25, ..., 975 for every prompt
    low = (t < 500).unsqueeze(1)
    signal = torch.where(low, score.unsqueeze(2), -width.unsqueeze(2))
    mse_ref = torch.full((p, n, d), 1.0)
    mse_pol = mse_ref - 1e-4 * (signal + 0.1 * torch.randn(p, n, d, generator=gen))
    judged = {"score": score, "width": width, "log_prob": score, "correct": torch.ones(p, n)}
    audit = PolicyAudit(mse_pol, mse_ref, t, judged, width.abs(), 5000.0, repeats=3, seed=0)
    low_band, high_band = audit.estimate(10, band=(0, 250)), audit.estimate(10, band=(750, 1000))
    assert (
        low_band["spearman"] > 0.9
        and low_band["accuracy"] == 1.0
        and low_band["gap_share"] == pytest.approx(1.0, abs=1e-3)
    )
    assert high_band["width_spearman"] < -0.9 and abs(high_band["spearman"]) < 0.3
    assert audit.estimate(6)["unet_forwards_per_prompt"] == 2 * n * 6
    tracks = audit.what_it_tracks()
    assert tracks["human_coef"] > 0.3 and tracks["width_coef"] < -0.3  # both drive the uniform-t mean
    for estimator in ("standardised", "ref_normalised", "rank"):
        assert audit.estimate(10, estimator=estimator, band=(0, 250))["spearman"] > 0.9


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from sail_fast.commands.train import run_sail

    run = tmp_path_factory.mktemp("toy") / "run"
    run_sail(
        load_config(
            REPO / "configs/toy-quick.yaml",
            [
                f"output_dir={run}",
                "sail.rounds=1",
                "sail.prompts_per_round=4",
                "toy.labelled_pairs=16",
                "toy.heldout_pairs=6",
                "sail.eval_prompts=4",
                "train.steps=2",
                "train.progress=false",
            ],
        )
    )
    return run


def test_the_selection_rule_uses_held_out_agreement_then_retest_then_cost_then_plainness():
    def row(estimator, k, heldout, retest, band=(0, 1000), se=0.04):
        return {
            "estimator": estimator,
            "k": k,
            "band": list(band),
            "heldout": heldout,
            "heldout_se": se,
            "retest": retest,
        }

    rows = [
        row("mean", 6, 0.54, 0.52),  # out: more than one SE below the best held-out agreement
        row("mean", 10, 0.62, 0.60, band=(0, 250)),  # the best held-out agreement, but the least stable
        row("rank", 10, 0.60, 0.79),
        row("standardised", 10, 0.61, 0.78),  # tied on test-retest: plainer wins
        row("ref_normalised", 6, 0.60, 0.70),  # kept, but 0.09 less stable
        row("standardised", 20, 0.70, 0.95),
    ]  # a K the rule does not compare
    rule = apply_selection_rule(rows)
    assert {(e["estimator"], e["k"]) for e in rule["kept"]} == {
        ("mean", 10),
        ("rank", 10),
        ("standardised", 10),
        ("ref_normalised", 6),
    }
    assert [e["estimator"] for e in rule["tied"]] == ["rank", "standardised"]
    assert (rule["chosen"]["estimator"], rule["chosen"]["k"]) == ("standardised", 10)
    # Equally stable at two K: the cheaper one.
    cheap = apply_selection_rule([row("rank", 10, 0.6, 0.80), row("rank", 6, 0.6, 0.79)])["chosen"]
    assert cheap["k"] == 6
    assert apply_selection_rule([{"estimator": "mean", "k": 6, "band": [0, 1000], "retest": 0.5}])["chosen"] is None


@pytest.mark.slow
def test_every_round_logs_its_self_label_quality(tiny_run):
    ranking = json.loads((tiny_run / "round-01/ranking.json").read_text())
    quality = ranking["label_quality"]
    # Recomputed from the round's saved candidates and rewards with the noiseless human: the same numbers.
    latents = load_file(tiny_run / "round-01/candidates.rank0.safetensors")["latents"]
    rewards = torch.tensor(ranking["rewards"])
    judged = oracle_samples(ToyOracle.load(), latents, ranking["prompts"])
    assert quality == pytest.approx(
        label_quality(judged, rewards, rewards.argmax(1), rewards.argmin(1), ("width", "log_prob"))
    )
    assert 0 <= quality["label_accuracy"] <= 1 and all(-1 <= quality[k] <= 1 for k in QUALITY[2:])
    for stage in ("iter0", "round-01"):
        metrics = json.loads((tiny_run / stage / "eval.json").read_text())
        assert all(math.isfinite(metrics[k]) for k in QUALITY) and 0 <= metrics["self_label_agreement"] <= 1
    assert "label_accuracy" not in json.loads((tiny_run / "base/eval.json").read_text())  # the base's reward is 0
    rows = json.loads((tiny_run / "metrics.json").read_text())
    assert rows[-1]["ranking_label_accuracy"] == quality["label_accuracy"]
    judged = (tiny_run / "summary.md").read_text().split("## Judged by the world")[1]  # after the round score
    table = [line for line in judged.splitlines() if line.startswith("|")]
    assert "| label accuracy | gap share | ρ(reward, human) | ρ(reward, width) | ρ(reward, log p) |" in table[0]
    iter0 = [cell.strip() for cell in table[3].split("|")[1:-1]]
    assert iter0[0] == "iter0" and all(math.isfinite(float(c)) for c in iter0[5:])


@pytest.mark.slow
def test_reward_audit_reports_real_numbers(tiny_run, tmp_path):
    out = reward_audit(
        tiny_run,
        out=tmp_path / "audit.md",
        prompts=3,
        candidates=3,
        draws=24,
        ks=(2, 4, 30),
        band_k=2,
        repeats=2,
        heldout_draws=4,
        progress=False,
    )
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["stages"]) == ["iter0", "round-01"] and results["ks"] == [2, 4]  # K above the bank is left out
    for stage in results["stages"].values():
        for row in stage["by_k"]:
            assert -1 <= row["spearman"] <= 1 and 0 <= row["accuracy"] <= 1 and -1 <= row["retest"] <= 1
            assert row["unet_forwards_per_prompt"] == 2 * 3 * row["k"]
        assert set(stage["by_band"]) == {"[0, 100)", "[0, 250)", "[250, 500)", "[500, 750)", "[750, 1000)"}
        spread = list(stage["spread_by_t"].values())
        assert spread[0] > spread[-1] > 0  # low-t draws tell candidates apart far more than high-t ones
        assert all(math.isfinite(v) for v in stage["tracks"].values())
        assert math.isfinite(stage["noise_corrected_spearman"]["value"])
        assert {(e["estimator"], tuple(e["band"]), e["k"]) for e in stage["estimators"]} == {
            (e, b, k)
            for e in ("mean", "standardised", "ref_normalised", "rank")
            for b in ((0, 1000), (0, 250))
            for k in (6, 10, 4, 2)
        }  # the rule's K, the loop's and the band K
        assert all(0 <= e["heldout"] <= 1 for e in stage["estimators"])
    report = out.read_text()
    assert "Choosing the estimator without the oracle" in report and "## By K" in report
    assert "Applied to iter0" in report and "Chosen, by K" in report
    rows = [line for line in report.splitlines() if line.startswith("| iter0 | 2 |")]
    assert len(rows) == 1 and all(math.isfinite(float(c.split("±")[0])) for c in rows[0].split("|")[2:-1])


@pytest.mark.slow
def test_reward_audit_refuses_a_folder_that_is_not_a_toy_run(tmp_path):
    done = subprocess.run(
        ["sail-fast", "toy", "reward-audit", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "is not a run folder (no config.yaml)" in done.stderr
