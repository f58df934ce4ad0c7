"""Prompt sets with groups, the summary and win-rate formulas, and `sail-fast eval` end to end."""

import json
import shutil

import pytest
import torch
from tiny_weights import hps_dir, tiny_clip_dir

from sail_fast.commands.cli import main
from sail_fast.commands.evaluate import checkpoint_labels, summarize, win_rate
from sail_fast.diffusion.prompts import HPS_STYLES, read_prompt_set
from sail_fast.diffusion.stack import TOY_MODEL_DIR
from sail_fast.toy.world import prompt_pool


def test_hpsv2_style_folder_json_styles_and_blocks(tmp_path):
    folder = tmp_path / "hps"
    folder.mkdir()
    for i, style in enumerate(HPS_STYLES):
        (folder / f"{style}.json").write_text(json.dumps([f"{style} prompt {k}" for k in range(3 + i)]))
    s = read_prompt_set(folder)
    assert s.name == "hpsv2" and len(s.prompts) == 3 + 4 + 5 + 6
    assert s.groups[:3] == ["anime"] * 3 and s.groups[-6:] == ["photo"] * 6
    assert all(p.startswith(g) for p, g in zip(s.prompts, s.groups))
    limited = s.limit(2)
    assert limited.groups == [g for g in HPS_STYLES for _ in range(2)]
    assert limited.prompts[2:4] == ["concept-art prompt 0", "concept-art prompt 1"]

    tagged = tmp_path / "tagged.json"
    tagged.write_text(json.dumps([{"prompt": "a", "style": "photo"}, {"prompt": "b", "style": "anime"}]))
    assert read_prompt_set(tagged).groups == ["photo", "anime"]

    combined = tmp_path / "combined.json"
    combined.write_text(json.dumps([{"prompt": f"p{i}"} for i in range(8)]))
    assert read_prompt_set(combined).groups is None  # auto: a plain list
    assert read_prompt_set(combined, "hpsv2").groups == [g for g in HPS_STYLES for _ in range(2)]
    combined.write_text(json.dumps([f"p{i}" for i in range(7)]))
    with pytest.raises(ValueError, match="equal blocks"):
        read_prompt_set(combined, "hpsv2")
    (folder / "photo.json").unlink()
    with pytest.raises(FileNotFoundError, match="photo.json"):
        read_prompt_set(folder)
    with pytest.raises(ValueError, match="unknown prompt set kind"):
        read_prompt_set(combined, "coco")


def test_parti_categories(tmp_path):
    tsv = tmp_path / "parti.tsv"
    tsv.write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n \tAbstract\tBasic\t\n"
        "a cat\tAnimals\tBasic\t\na dog\tAnimals\tBasic\t\n"
    )
    s = read_prompt_set(tsv)
    assert (s.name, s.prompts, s.groups) == ("parti", ["bond", "a cat", "a dog"], ["Abstract", "Animals", "Animals"])
    assert s.limit(1).prompts == ["bond", "a cat"]


def test_summary_and_win_rate_formulas():
    scores = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0], [5.0, 7.0]])  # per-prompt means 2, 2, 2, 6
    s = summarize(scores, ["x", "y", "x", "y"])
    assert s["mean"] == pytest.approx(3.0)
    assert s["sem"] == pytest.approx(torch.tensor([2.0, 2, 2, 6]).std().item() / 2)
    assert s["groups"]["x"]["mean"] == pytest.approx(2.0) and s["groups"]["y"]["mean"] == pytest.approx(4.0)
    assert list(s["groups"]) == ["x", "y"] and s["groups"]["x"]["prompts"] == 2
    baseline = torch.tensor([[2.0, 2.0], [1.0, 1.0], [3.0, 3.0], [6.0, 6.0]])  # means 2, 1, 3, 6
    r = win_rate(scores, baseline)
    assert (r["wins"], r["ties"], r["losses"]) == (1, 2, 1) and r["win_rate"] == pytest.approx(0.5)
    assert win_rate(scores + 10, baseline)["win_rate"] == 1.0
    assert checkpoint_labels(["runs/a/final", "runs/b/final"]) == ["a/final", "b/final"]


def _perturbed_toy_copy(path, scale):
    """The shipped toy pipeline with its UNet weights nudged, so it samples differently."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(TOY_MODEL_DIR, path)
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    unet.save_pretrained(path / "unet")
    return path


@pytest.mark.slow
def test_eval_cli_on_the_toy_world(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p for p, _ in prompt_pool()[::100]))  # 11 prompts, several digits
    other = _perturbed_toy_copy(tmp_path / "nudged", 0.3)
    out = tmp_path / "eval"
    args = [
        "eval",
        "--checkpoint",
        str(TOY_MODEL_DIR),
        "--checkpoint",
        str(TOY_MODEL_DIR),
        "--checkpoint",
        str(other),
        "--prompts",
        str(prompts),
        "--metrics",
        "toy_oracle,digit_accuracy",
        "--out",
        str(out),
        "--images-per-prompt",
        "2",
        "--steps",
        "6",
        "--sampler",
        "ddim",
        "--guidance-scale",
        "3",
        "--batch-size",
        "4",
    ]
    main(args)
    assert "Per-prompt win rates" in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    sampling = result["checkpoints"][0]["sampling"]
    assert sampling == {"sampler": "ddim", "num_inference_steps": 6, "guidance_scale": 3.0}
    assert result["seed"] == 0 and result["images_per_prompt"] == 2
    assert result["metrics"]["toy_oracle"]["version"].startswith("toy human")
    labels = [c["label"] for c in result["checkpoints"]]
    # the same checkpoint twice: identical pictures, every prompt a tie
    same = result["win_rates"][f"{labels[1]} vs {labels[0]}"]["toy_oracle"]
    assert (same["ties"], same["win_rate"]) == (11, 0.5)
    # the nudged copy: the win rate is the literal per-prompt comparison of the stored scores
    stored = {p.stem: json.loads(p.read_text()) for p in (out / "scores").glob("*.json")}
    base_scores = torch.tensor(next(v for k, v in stored.items() if k.startswith("0_"))["scores"]["toy_oracle"])
    nudged_scores = torch.tensor(next(v for k, v in stored.items() if "nudged" in k)["scores"]["toy_oracle"])
    assert base_scores.shape == (11, 2) and not torch.equal(base_scores, nudged_scores)
    wins = (nudged_scores.mean(1) > base_scores.mean(1)).sum().item()
    ties = (nudged_scores.mean(1) == base_scores.mean(1)).sum().item()
    got = result["win_rates"][f"{labels[2]} vs {labels[0]}"]["toy_oracle"]
    assert got["win_rate"] == pytest.approx((wins + ties / 2) / 11)
    assert result["checkpoints"][0]["scores"]["toy_oracle"]["mean"] == pytest.approx(
        base_scores.mean().item(), abs=1e-6
    )
    assert (out / "eval.md").read_text().count("|") > 20 and len(list(out.glob("samples-*.png"))) == 3

    # rerun: every checkpoint's scores are reused, nothing is sampled again
    import sail_fast.commands.evaluate as evaluate_module

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(evaluate_module, "score_checkpoint", no_sampling)
    main(args)
    assert json.loads((out / "eval.json").read_text()) == result


@pytest.mark.slow
def test_eval_sd_stack_with_vae_and_clip_metrics(tmp_path):
    """An SD-shaped pipeline (VAE decode to RGB) scored by PickScore and HPSv2 from tiny local weights,
    on grouped prompts."""
    from sail_fast.diffusion.tiny import tiny_stack

    tiny_stack("sd15", with_vae=True).save_pretrained(tmp_path / "pipe")
    tiny_clip_dir(tmp_path / "weights" / "pickscore")
    hps_dir(tmp_path / "weights" / "hpsv2")
    folder = tmp_path / "hps_prompts"
    folder.mkdir()
    for style in HPS_STYLES:
        (folder / f"{style}.json").write_text(json.dumps([f"a {style} cat", f"a {style} dog", f"{style} sky"]))
    out = tmp_path / "eval"
    main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "pipe"),
            "--prompts",
            str(folder),
            "--metrics",
            "pickscore,hpsv2",
            "--weights-dir",
            str(tmp_path / "weights"),
            "--out",
            str(out),
            "--limit",
            "2",
            "--steps",
            "3",
            "--device",
            "cpu",
        ]
    )
    result = json.loads((out / "eval.json").read_text())
    assert result["prompt_set"] == {"name": "hpsv2", "prompts": 8, "groups": list(HPS_STYLES)}
    assert result["metrics"]["hpsv2"]["version"] == "HPSv2.1"
    scores = result["checkpoints"][0]["scores"]["hpsv2"]
    assert scores["mean"] == pytest.approx(sum(g["mean"] for g in scores["groups"].values()) / 4)
    assert all(-1 <= g["mean"] <= 1 for g in scores["groups"].values())  # a cosine
    assert "## hpsv2 by group" in (out / "eval.md").read_text()


def test_eval_fails_fast_on_missing_weights(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(SystemExit) as code:  # a user's mistake: one line on stderr, exit status 2
        main(
            [
                "eval",
                "--checkpoint",
                str(TOY_MODEL_DIR),
                "--prompts",
                str(prompts),
                "--metrics",
                "imagereward",
                "--weights",
                f"imagereward={tmp_path}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert code.value.code == 2 and "ImageReward.pt" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):  # --debug: the exception itself
        main(
            [
                "eval",
                "--checkpoint",
                str(TOY_MODEL_DIR),
                "--prompts",
                str(prompts),
                "--metrics",
                "imagereward",
                "--weights",
                f"imagereward={tmp_path}",
                "--out",
                str(tmp_path / "o"),
                "--debug",
            ]
        )
    with pytest.raises(SystemExit, match="NAME=PATH"):
        main(
            [
                "eval",
                "--checkpoint",
                str(TOY_MODEL_DIR),
                "--prompts",
                str(prompts),
                "--metrics",
                "pickscore",
                "--weights",
                "pickscore",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o").exists()
