"""The stage a run keeps and when it stops (sail.select, sail.early_stop): the rule on planted round scores,
then in the loop on a tiny run whose held-out fit is planted (a collapse is stopped, an improving run is not),
and `export RUN` / `generate RUN` taking the kept stage."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sail_fast.runs.config import load_config
from sail_fast.sail import evaluation
from sail_fast.sail.loop import SailLoop
from sail_fast.sail.selection import (
    CHOICE_TOLERANCE,
    CONSISTENCY_TOLERANCE,
    PAIRED_SE,
    choose_stage,
    consistency_drop,
    paired_drop,
    stop_reason,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_overrides  # noqa: E402
from test_train import TINY  # noqa: E402

LOG2 = math.log(2.0)


def rows(losses, consistency=None, accuracy=None):
    """Metric rows base, iter0, round-01, ... with planted held-out losses (prompt consistency, accuracy)."""
    names = ["base", "iter0"] + [f"round-{r:02d}" for r in range(1, len(losses) - 1)]
    consistency = consistency or [0.16] * len(losses)
    accuracy = accuracy or [0.5] + [0.6] * (len(losses) - 1)
    return [
        {"stage": n, "round": i - 1, "heldout_dpo_loss": loss, "prompt_consistency": c, "heldout_accuracy": a}
        for i, (n, loss, c, a) in enumerate(zip(names, losses, consistency, accuracy))
    ]


def test_auto_keeps_the_lowest_held_out_loss_and_stops_on_a_collapse():
    collapse = rows([LOG2, 0.62, 0.58, 0.66, 0.80])
    assert choose_stage(collapse, "loss")["stage"] == "round-01"
    # The loop asks after each round: go on after round 1, stop after round 2 (no lower loss for 1 round).
    assert stop_reason(collapse[:3], patience=1, rule="loss") is None
    assert "has not improved on round-01" in stop_reason(collapse[:4], patience=1, rule="loss")
    assert stop_reason(collapse[:4], patience=2, rule="loss") is None and "round-01" in stop_reason(
        collapse, patience=2, rule="loss"
    )
    assert choose_stage(collapse, "last")["stage"] == "round-03"


def test_an_improving_run_is_never_stopped_and_keeps_its_last_round():
    improving = rows([LOG2, 0.62, 0.58, 0.55, 0.50, 0.49])
    assert all(stop_reason(improving[: k + 1], patience=1, rule="loss") is None for k in range(1, len(improving)))
    assert choose_stage(improving, "loss")["stage"] == "round-04"


def test_a_stage_that_loses_its_prompt_is_not_kept_and_stops_the_rounds():
    losses = [LOG2, 0.62, 0.58, 0.50]
    lost = 0.16 * (1 - CONSISTENCY_TOLERANCE) - 1e-3  # just past the tolerance
    planted = rows(losses, [0.16, 0.16, 0.158, lost])
    chosen = choose_stage(planted, "loss")
    assert chosen["stage"] == "round-01" and "round-02 lost more than" in chosen["reason"]
    assert "prompt consistency" in stop_reason(planted, patience=5, rule="loss")
    # Inside the tolerance it is kept.
    assert (
        choose_stage(rows(losses, [0.16, 0.16, 0.158, 0.16 * (1 - CONSISTENCY_TOLERANCE) + 1e-3]))["stage"]
        == "round-02"
    )


def test_no_stage_beating_the_base_keeps_the_base_and_no_held_out_pairs_keep_the_last():
    assert choose_stage(rows([LOG2, 0.70, 0.75]), "loss")["stage"] == "base"
    unscored = [{"stage": "base", "round": -1}, {"stage": "iter0", "round": 0}, {"stage": "round-01", "round": 1}]
    chosen = choose_stage(unscored, "loss")
    assert chosen["stage"] == "round-01" and "no held-out human pairs" in chosen["reason"]
    assert stop_reason(unscored, patience=1, rule="loss") is None and stop_reason(unscored, patience=1) is None
    assert choose_stage(unscored)["stage"] == "round-01"  # guarded: nothing says a stage is unsound
    with pytest.raises(ValueError, match="no stage has been evaluated"):
        choose_stage([])


def test_agreement_keeps_the_most_agreeing_stage_inside_guardeds_sound_run():
    planted = rows([LOG2, 1.4, 2.0, 2.5, 3.0], accuracy=[0.5, 0.6, 0.6, 0.6, 0.45])  # round-03 unsound
    for row, agreement in zip(planted[1:], [0.60, 0.66, 0.66, 0.90]):
        row["self_label_agreement"] = agreement
    assert choose_stage(planted, "guarded")["stage"] == "round-02"
    chosen = choose_stage(planted, "agreement")  # round-03 agrees most but is past the sound run; ties: earlier
    assert chosen["stage"] == "round-01" and "0.660" in chosen["reason"] and "up to round-02" in chosen["reason"]
    assert "no better than chance" in stop_reason(planted, patience=1, rule="agreement")
    # Nothing recorded: guarded's choice; an unsound iter0: the base.
    assert choose_stage(rows([LOG2, 1.4, 2.0]), "agreement")["stage"] == "round-01"
    assert choose_stage(rows([LOG2, 1.4, 2.0], accuracy=[0.5, 0.4, 0.7]), "agreement")["stage"] == "base"


def test_guarded_keeps_the_last_sound_stage_and_stops_at_the_first_unsound_one():
    sound = rows([LOG2, 1.4, 2.0, 2.5, 3.0])  # the loss rises with every stage: guarded does not read it
    assert choose_stage(sound)["stage"] == "round-03"
    assert all(stop_reason(sound[: k + 1], patience=1) is None for k in range(2, len(sound)))
    lost = 0.16 * (1 - CONSISTENCY_TOLERANCE) - 1e-3
    legibility = rows([LOG2, 1.4, 2.0, 2.5, 3.0], consistency=[0.16, 0.16, 0.159, lost, 0.16])
    chosen = choose_stage(legibility)
    assert chosen["stage"] == "round-01" and "round-02 kept less than 96.5%" in chosen["reason"]
    assert stop_reason(legibility[:3], patience=1) is None
    assert "prompt consistency" in stop_reason(legibility[:4], patience=1)
    chance = rows([LOG2, 1.4, 2.0, 2.5], accuracy=[0.5, 0.62, 0.5, 0.7])  # round 1 ranks at chance
    assert choose_stage(chance)["stage"] == "iter0" and "no better than chance" in stop_reason(chance[:3], patience=1)
    assert choose_stage(rows([LOG2, 1.4], accuracy=[0.5, 0.48]))["stage"] == "base"


def by_prompt(rows_, per_stage):
    """``rows_`` with per-prompt consistency: ``per_stage[i]`` is stage i's values (prompt order shared)."""
    for row, values in zip(rows_, per_stage):
        row["prompt_consistency_by_prompt"] = values
        row["prompt_consistency"] = sum(values) / len(values)
    return rows_


def test_paired_counts_a_consistency_drop_only_beyond_its_noise_and_the_tolerance():
    gen = torch.Generator().manual_seed(0)
    base = (0.16 + 0.03 * torch.randn(100, generator=gen)).tolist()
    noise = lambda sd: [sd if i % 2 else -sd for i in range(100)]  # noqa: E731  mean 0, SD about sd
    # iter0 drops 5% of the base's mean on average, but prompt by prompt the drop is noise (SE about 0.006):
    # the threshold calls it lost, the paired test does not.
    noisy = [b - 0.008 + e for b, e in zip(base, noise(0.06))]
    # round-02 drops the same 5% on every prompt alike: far beyond 2 SE and the tolerance.
    steady = [b - 0.008 + e for b, e in zip(base, noise(0.001))]
    # round-01 drops 2% on every prompt: beyond 2 SE but within the tolerance.
    within = [b * 0.98 for b in base]
    planted = by_prompt(rows([LOG2, 1.4, 2.0, 2.5]), [base, noisy, within, steady])  # base .. round-02
    drop, se, base_mean = consistency_drop(planted[1], planted[0])
    assert drop > CONSISTENCY_TOLERANCE * base_mean and drop < PAIRED_SE * se
    assert choose_stage(planted, "guarded")["stage"] == "base"  # the threshold fires on the noise at iter0
    chosen = choose_stage(planted, "paired")
    assert chosen["stage"] == "round-01" and chosen["rule"] == "paired"
    assert "round-02's prompt consistency fell" in chosen["reason"] and "more than 2 SE" in chosen["reason"]
    assert stop_reason(planted[:3], patience=1, rule="paired") is None
    assert "prompt by prompt" in stop_reason(planted, patience=1, rule="paired")
    # The drop is measured against the base, not the stage before: a stage that only recovers is sound.
    recovered = planted[0] | {"stage": "round-02", "round": 2, "heldout_accuracy": 0.6}
    assert choose_stage(planted[:3] + [recovered], "paired")["stage"] == "round-02"
    # Rows without per-prompt values (runs evaluated before they were recorded): the threshold decides.
    plain = rows([LOG2, 1.4, 2.0], consistency=[0.16, 0.16 * 0.95, 0.16])
    assert choose_stage(plain, "paired")["stage"] == choose_stage(plain, "guarded")["stage"] == "base"
    # Values for a different number of prompts are not paired: the threshold decides there too.
    assert consistency_drop(planted[1], planted[0] | {"prompt_consistency_by_prompt": base[:50]}) is None
    with pytest.raises(ValueError, match="iter0: prompt_consistency_by_prompt must hold finite numbers"):
        consistency_drop(planted[1] | {"prompt_consistency_by_prompt": ["x"] * 100}, planted[0])


def with_choice(rows_, per_stage, pairs=100):
    """``rows_`` with per-prompt prompt choice (each prompt's share of 10 samples) and the held-out pair count."""
    for row, values in zip(rows_, per_stage):
        row |= {"prompt_choice_by_prompt": values, "prompt_choice_accuracy": sum(values) / len(values)}
        row["heldout_pairs"] = pairs
    return rows_


def test_tested_reads_the_prompt_choice_paired_and_the_held_out_accuracy_against_its_noise():
    base = [0.9 if i % 3 else 0.8 for i in range(100)]  # shares of 10 samples per prompt
    flip = lambda k: [b - (0.1 if i % k == 0 else 0.0) for i, b in enumerate(base)]  # noqa: E731 one sample in 1/k prompts
    # A new style lowers the consistency ratio by 10% (guarded loses the prompt at iter0), but every sample still
    # picks its own prompt; round-01 loses one sample in every tenth prompt (0.010: beyond 2 SE, within the
    # tolerance); round-02 one in every second prompt (0.050: beyond both).
    planted = rows([LOG2, 1.4, 2.0, 2.5], consistency=[0.16, 0.144, 0.144, 0.144])
    planted = with_choice(planted, [base, base, flip(10), flip(2)])
    drop, se, _ = paired_drop(planted[2], planted[0], "prompt_choice_by_prompt")
    assert drop == pytest.approx(0.010) and PAIRED_SE * se < drop < CHOICE_TOLERANCE
    assert choose_stage(planted, "guarded")["stage"] == "base"
    chosen = choose_stage(planted, "tested")
    assert chosen["stage"] == "round-01" and chosen["rule"] == "tested"
    assert "round-02's prompt choice accuracy fell 0.050" in chosen["reason"]
    assert stop_reason(planted[:3], patience=1, rule="tested") is None
    assert "prompt choice" in stop_reason(planted, patience=1, rule="tested")

    # Held-out accuracy: 0.45 on 100 pairs is chance (the floor is 0.5 - 2 x 0.05 = 0.40); 0.38 is not.
    chance = with_choice(rows([LOG2, 1.4, 2.0, 2.5], accuracy=[0.5, 0.45, 0.6, 0.38]), [base] * 4)
    assert choose_stage(chance, "guarded")["stage"] == "base"
    chosen = choose_stage(chance, "tested")
    assert chosen["stage"] == "round-01" and "below 0.400: 2 SE under 0.5 at 100 pairs" in chosen["reason"]
    # More pairs, a narrower band: at 400 pairs the floor is 0.45, and 0.44 fails.
    assert (
        choose_stage(with_choice(rows([LOG2, 1.4], accuracy=[0.5, 0.44]), [base] * 2, 400), "tested")["stage"] == "base"
    )
    # Rows without the per-prompt choices fall back to an unpaired drop; without the pair count, to 0.5.
    bare = [{k: v for k, v in row.items() if k not in ("prompt_choice_by_prompt", "heldout_pairs")} for row in planted]
    assert choose_stage(bare, "tested")["stage"] == "round-01"
    assert (
        choose_stage([{k: v for k, v in r.items() if k != "heldout_pairs"} for r in chance], "tested")["stage"]
        == "base"
    )


def planted_fit(monkeypatch, losses):
    """The loop's held-out fit returns ``losses`` stage by stage (base first), with accuracy above chance."""
    calls = iter(losses)

    def fit(policy, base, *args, **kwargs):
        return {"heldout_dpo_loss": next(calls), "heldout_accuracy": 0.6, "heldout_drift": 0.0}

    monkeypatch.setattr(evaluation, "heldout_fit", fit)
    # The tiny random stack's prompt consistency is noise: held at the base's so only the planted loss decides.
    steady = {"prompt_consistency": 0.16, "prompt_choice_accuracy": 1.0}
    monkeypatch.setattr(evaluation, "prompt_consistency", lambda *args, **kwargs: steady)


@pytest.mark.slow
def test_the_loop_stops_a_planted_collapse_and_keeps_its_best_round(tmp_path, monkeypatch):
    planted_fit(monkeypatch, [LOG2, 0.62, 0.58, 0.66, 0.5])  # round 3 (0.5) must never be reached
    overrides = make_overrides(tmp_path, "sail.rounds=3", "sail.early_stop=true", "sail.select=loss")
    SailLoop(load_config(TINY, overrides)).run()
    run = tmp_path / "run"
    chosen = json.loads((run / "chosen.json").read_text())
    assert chosen["stage"] == "round-01" and chosen["rounds_run"] == 2
    assert "has not improved on round-01" in chosen["early_stop"]
    assert not (run / "round-03").exists()
    assert [r["stage"] for r in json.loads((run / "metrics.json").read_text())][-1] == "round-02"
    summary = (run / "summary.md").read_text()
    assert "| **round-01** (kept) | 0.5800 |" in summary and "Stopped early after 2 rounds" in summary
    # A resumed run reads the same scores from disk and stops at the same place: nothing more is trained.
    SailLoop(load_config(TINY, overrides)).run(resume=True)
    assert not (run / "round-03").exists() and json.loads((run / "chosen.json").read_text()) == chosen

    # export and generate given the run folder take the kept stage, not the newest.
    from sail_fast.commands.generate import export_unet, resolve_checkpoint

    exported = export_unet(run, tmp_path / "export")
    name = "diffusion_pytorch_model.safetensors"
    kept, newest = (
        load_file(run / "round-01/train/final/unet" / name),
        load_file(run / "round-02/train/final/unet" / name),
    )
    ours = load_file(exported / name)
    assert all((ours[k] == kept[k]).all() for k in kept) and any((ours[k] != newest[k]).any() for k in kept)
    # A run that keeps its base gives the base model; a crafted chosen.json naming a path is refused.
    (run / "chosen.json").write_text(json.dumps(chosen | {"stage": "base"}))
    stack, _ = resolve_checkpoint(run)
    base = SailLoop(load_config(TINY, overrides)).base.state_dict()
    assert all((stack.unet.state_dict()[k] == v).all() for k, v in base.items())
    (run / "chosen.json").write_text(json.dumps(chosen | {"stage": "../../elsewhere"}))
    with pytest.raises(ValueError, match="'stage' must name a stage of the run"):
        resolve_checkpoint(run)


@pytest.mark.slow
def test_the_loop_runs_every_round_of_an_improving_run(tmp_path, monkeypatch):
    planted_fit(monkeypatch, [LOG2, 0.62, 0.58, 0.55])
    SailLoop(load_config(TINY, make_overrides(tmp_path, "sail.early_stop=true", "sail.select=loss"))).run()
    chosen = json.loads((tmp_path / "run/chosen.json").read_text())
    assert chosen == chosen | {"stage": "round-02", "rounds_run": 2, "early_stop": None}


def test_early_stop_needs_every_round_evaluated():
    with pytest.raises(ValueError, match="sail.early_stop reads every round's score"):
        load_config(TINY, ["sail.early_stop=true", "sail.eval_each_round=false"])
