"""The results table: the right runs on the right lines, mean ± std over seeds, paired change."""

import json
from pathlib import Path

import pytest

from sail_fast.config import load_config
from sail_fast.toy_experiment import condition_overrides, write_table


def fake_run(path, stages):
    path.mkdir(parents=True)
    rows = [{"stage": s, "oracle_score": v, "digit_accuracy": 0.5, "diversity": 0.1} for s, v in stages.items()]
    (path / "metrics.json").write_text(json.dumps(rows))


def test_table_lines_means_and_paired_changes(tmp_path):
    for seed, offset in ((0, 0.0), (1, 1.0)):
        root = tmp_path / f"seed-{seed}"
        fake_run(root / "sail", {"base": -2 + offset, "iter0": -1.5 + offset, "round-01": -1 + offset, "round-02": -0.5 + offset})
        fake_run(root / "no-mixup", {"base": -2 + offset, "round-02": -3 + offset})
        fake_run(root / "random-pairs", {"base": -2 + offset, "round-02": -2.5 + offset})
        fake_run(root / "dpo-full", {"base": -2 + offset, "iter0": -1.8 + offset})
        (root / "human").mkdir()
        (root / "human/summary.json").write_text(json.dumps({"seed": 96, "labelled": 1600}))
    table = write_table(tmp_path, [0, 1], rounds=2).read_text().splitlines()
    cell = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert cell["base model"][1] == "-1.500 ± 0.707"  # -2 and -1
    assert cell["SAIL round 2"][0] == "96 (6%)" and cell["SAIL round 2"][-2] == "1.500 ± 0.000"
    assert cell["Diffusion-DPO, 100% of labels"][0] == "1600 (100%)" and cell["Diffusion-DPO, 100% of labels"][-2] == "0.200 ± 0.000"
    assert cell["SAIL round 2, no mixup (alpha = 1)"][-2] == "-1.000 ± 0.000"
    assert cell["SAIL round 2, random pairs"][-1] == "2"
    assert not any("OnlineDPO" in name for name in cell)  # the other systems appear once they have run
    fake_run(tmp_path / "seed-0" / "online-dpo", {"round-02": 0.5})
    table = write_table(tmp_path, [0, 1], rounds=2).read_text()
    assert "| OnlineDPO round 2 (oracle ranks) | 96 (6%) | 0.500 ± 0.000 |" in table
    assert (tmp_path / "results.png").stat().st_size > 0


def test_conditions_share_the_seed_data_and_iter0(tmp_path):
    config = load_config(Path(__file__).resolve().parents[1] / "configs/toy.yaml")
    no_mixup = condition_overrides("no-mixup", 3, tmp_path / "seed-3", config, ablation_rounds=2)
    assert f"toy.data_dir={tmp_path / 'seed-3' / 'human'}" in no_mixup
    assert f"sail.iter0_from={tmp_path / 'seed-3' / 'sail' / 'iter0'}" in no_mixup
    assert "train.mixup_alpha=1.0" in no_mixup and "sail.rounds=2" in no_mixup
    full = condition_overrides("dpo-full", 3, tmp_path / "seed-3", config)
    steps = config.sail.iter0_steps + config.sail.rounds * config.sail.round_steps
    assert "toy.train_on=all" in full and "sail.rounds=0" in full and f"sail.iter0_steps={steps}" in full
    for name in ("online-dpo", "smpo", "smoothed-self", "realalign", "sail-realalign"):
        overrides = condition_overrides(name, 3, tmp_path / "seed-3", config, ablation_rounds=2)
        load_config(Path(__file__).resolve().parents[1] / "configs/toy.yaml", overrides)  # valid as a whole
        assert f"sail.iter0_from={tmp_path / 'seed-3' / 'sail' / 'iter0'}" in overrides
    smpo = condition_overrides("smpo", 3, tmp_path / "seed-3", config)
    assert {"sail.ranker_metric=toy_oracle", "sail.soft_labels=true", "train.noising=ddim_inversion"} <= set(smpo)
    assert "sail.pair_sources=[real]" in condition_overrides("realalign", 3, tmp_path / "seed-3", config)
    assert "sail.pair_sources=[self, real]" in condition_overrides("sail-realalign", 3, tmp_path / "seed-3", config)
    with pytest.raises(ValueError, match="unknown condition"):
        condition_overrides("sft", 3, tmp_path, config)
