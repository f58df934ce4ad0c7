"""Nothing lost, nothing silently wrong: the run folder's safety rules, NaN guards, config-checked
resume, verified checkpoints, a keyed encode cache, and clear one-line errors."""

import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from sail_fast.commands.cli import main
from sail_fast.commands.train import run_training
from sail_fast.data.records import PairRecord, write_pairs_jsonl
from sail_fast.diffusion.build import build_stack
from sail_fast.diffusion.images import decode_latents, image_grid
from sail_fast.dpo.builder import trainer_for
from sail_fast.dpo.trainer import NonFiniteError
from sail_fast.runs.config import ConfigError, load_config
from sail_fast.runs.run_folder import (
    LOCK,
    ConfigChangedError,
    FolderInUseError,
    RunLock,
    RunLockedError,
)
from sail_fast.sail.loop import SailLoop
from sail_fast.sail.ranking import drop_non_finite, soft_labels

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_config  # noqa: E402
from test_train import TINY, planted_pairs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOY_QUICK = REPO / "configs" / "toy-quick.yaml"


def _tiny(tmp_path, *overrides):
    config = load_config(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])
    return config, build_stack(config.model, seed=config.seed, device=torch.device("cpu"))


def _all_finite(folder: Path) -> bool:
    files = list(folder.rglob("*.safetensors"))
    return bool(files) and all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


# ------------------------------------------------------------------ 1. a user's folder is never deleted
def test_toy_data_dir_holding_other_files_is_refused_and_kept(tmp_path):
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    config = load_config(TOY_QUICK, [f"output_dir={tmp_path / 'run'}", f"toy.data_dir={mine}"])
    with pytest.raises(FolderInUseError, match="thesis.tex.*never deletes"):
        SailLoop(config).run()
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_shared_toy_labels_made_with_other_settings_are_refused(tmp_path):
    human = tmp_path / "human"
    human.mkdir()
    done = {"labelled": 40, "settings": {"labelled_pairs": 40, "seed_fraction": 0.5, "heldout_pairs": 8, "seed": 0}}
    (human / "done.json").write_text(json.dumps(done))
    config = load_config(
        TOY_QUICK,
        [
            f"output_dir={tmp_path / 'run'}",
            f"toy.data_dir={human}",
            "toy.labelled_pairs=80",
            "toy.seed_fraction=0.25",
            "toy.heldout_pairs=8",
        ],
    )
    with pytest.raises(
        ValueError,
        match="labelled with other settings: labelled_pairs 40 there, 80 here; seed_fraction 0.5 there, 0.25 here",
    ):
        SailLoop(config).run()


def test_toy_world_refuses_sail_prompts_it_would_ignore():
    with pytest.raises(ConfigError, match="sail.prompts='mine.txt' is set, but the toy world"):
        load_config(TOY_QUICK, ["sail.prompts=mine.txt"])


# --------------------------------------------------------------------------- 2. NaN and inf
def test_diverging_training_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config, stack = _tiny(
        tmp_path, "train.learning_rate=1e4", "train.steps=20", "train.checkpoint_every=1", "train.keep_checkpoints=50"
    )
    trainer = trainer_for(config, stack.unet, stack.scheduler, planted_pairs(stack, 64, 0))
    with pytest.raises(NonFiniteError, match=r"training diverged at step \d+: loss .*last finite loss was .* at step"):
        trainer.train()
    run = tmp_path / "run"
    assert not (run / "final").exists()
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints and all(_all_finite(c) for c in checkpoints)
    assert trainer.step < 20


def test_a_nan_pair_ends_the_cli_run_with_exit_2_and_no_weights(tmp_path):
    config, stack = _tiny(tmp_path)
    pairs = planted_pairs(stack, 16, 0)
    pairs.win[3, 0, 0, 0] = float("nan")
    pairs.save(tmp_path / "pairs.safetensors")
    cmd = [
        sys.executable,
        "-m",
        "sail_fast.commands.cli",
        "train",
        "--config",
        str(TINY),
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--set",
        f"data.seed_pairs=[{tmp_path / 'pairs.safetensors'}]",
        "--set",
        "train.pairs_per_step=16",
        "--set",
        "train.micro_batch_pairs=16",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "training diverged at step 1: loss nan" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "final").exists() and not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_a_nan_candidate_is_never_best_or_worst():
    latents = torch.randn(3, 4, 1, 2, 2)
    scores = torch.tensor([[0.1, 0.9, -0.5, 0.2], [0.3, 0.2, 0.1, 0.0], [1.0, 0.0, float("nan"), float("inf")]])
    latents[0, 1, 0, 0, 0] = float("nan")  # the best-scored candidate of prompt 0 holds a NaN pixel
    latents[1, :3] = float("nan")  # prompt 1 keeps one finite candidate: no pair
    win, lose = scores.nan_to_num(-1e9).argmax(1), scores.nan_to_num(1e9).argmin(1)
    kept_scores, win, lose, keep, dropped = drop_non_finite(scores, latents, win, lose)
    assert dropped == 1 + 3 + 2
    assert keep.tolist() == [True, False, True]
    assert (win[0], lose[0]) == (3, 2) and (win[2], lose[2]) == (0, 1)
    labels = soft_labels(kept_scores, win, lose)
    assert torch.isfinite(labels[keep]).all()


def test_sail_round_drops_non_finite_candidates(tmp_path, monkeypatch):
    from sail_fast.sail import pairing as loop_module

    real = loop_module.generate_candidates

    def one_nan_candidate(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.latents.shape[1] == 4:  # a round's candidates (the evaluation draws 2 per prompt)
            latents = out.latents.clone()
            latents[0, 2, 0, 0, 0] = float("nan")
            out = dataclasses.replace(out, latents=latents)
        return out

    monkeypatch.setattr(loop_module, "generate_candidates", one_nan_candidate)
    SailLoop(make_config(tmp_path, "sail.rounds=1")).run()
    ranking = json.loads((tmp_path / "run/round-01/ranking.json").read_text())
    assert ranking["dropped_candidates"] == 1 and ranking["rewards"][0][2] is None
    pairs = load_file(tmp_path / "run/round-01/pairs.safetensors")
    assert all(torch.isfinite(v).all() for v in pairs.values() if v.is_floating_point())
    assert "1 candidates had a non-finite reward" in (tmp_path / "run/sail.log").read_text()


@pytest.mark.slow
def test_eval_reports_non_finite_pictures_instead_of_scoring_them(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from sail_fast.diffusion.stack import TOY_MODEL_DIR

    broken = tmp_path / "broken"
    shutil.copytree(TOY_MODEL_DIR, broken)
    unet = UNet2DConditionModel.from_pretrained(broken / "unet")
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(broken / "unet")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 3\na handwritten 7\n")
    main(
        [
            "eval",
            "--checkpoint",
            str(broken),
            "--prompts",
            str(prompts),
            "--metrics",
            "toy_oracle",
            "--out",
            str(tmp_path / "eval"),
            "--steps",
            "2",
            "--sampler",
            "ddim",
            "--images-per-prompt",
            "2",
        ]
    )
    result = json.loads((tmp_path / "eval/eval.json").read_text())
    score = result["checkpoints"][0]["scores"]["toy_oracle"]
    assert score["non_finite_images"] == 4 and score["prompts"] == 0
    assert "4 pictures hold NaN or inf" in capsys.readouterr().out
    grid = np.asarray(Image.open(next((tmp_path / "eval").glob("samples-*.png"))).convert("RGB"))
    red = (grid[..., 0] > 150) & (grid[..., 1] < 100)
    assert red.mean() > 0.2  # the red NaN markers, not black squares


def test_a_nan_latent_is_drawn_as_a_marker_not_a_black_picture():
    latents = torch.zeros(2, 1, 16, 16)
    latents[1, 0, 3, 3] = float("nan")
    ok, bad = (np.asarray(im.convert("RGB")) for im in decode_latents(latents))
    assert (ok == ok[0, 0]).all()  # a plain grey picture
    assert bad[..., 0].mean() > 150 and bad[..., 1].mean() < 120  # red


# ----------------------------------------------------------------------- 3. config-checked resume
def test_resume_with_a_changed_config_is_refused_with_the_diff(tmp_path):
    config = make_config(tmp_path, "sail.rounds=0")
    SailLoop(config).run()
    first = (tmp_path / "run/config.yaml").read_text()
    changed = make_config(tmp_path, "sail.rounds=0", "train.beta=2000")
    with pytest.raises(ConfigChangedError, match=r"(?s)train.beta: 5000.0 -> 2000.0.*--allow-config-change"):
        SailLoop(changed).run(resume=True)
    assert (tmp_path / "run/config.yaml").read_text() == first
    assert yaml.safe_load((tmp_path / "run/iter0/config.yaml").read_text())["train"]["steps"] == 2  # as the stage ran
    SailLoop(make_config(tmp_path, "sail.rounds=0", "train.progress=true")).run(resume=True)  # result-neutral key
    SailLoop(changed).run(resume=True, allow_config_change=True)
    assert (tmp_path / "run/config.yaml").read_text() == first
    assert yaml.safe_load((tmp_path / "run/config.resume-1.yaml").read_text())["train"]["beta"] == 2000.0
    assert "train.beta: 5000.0 -> 2000.0" in (tmp_path / "run/sail.log").read_text()


# ---------------------------------------------------------------------------- 4. the encode cache
def test_an_image_fixed_on_disk_is_encoded_again(tmp_path):
    from sail_fast.data.sources import load_pairs
    from sail_fast.diffusion.tiny import tiny_stack

    stack = tiny_stack("sd15", sample_size=8, in_channels=1)

    def image(seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8), "L")

    write_pairs_jsonl(
        tmp_path / "pairs.jsonl", [PairRecord("a 1", image(0), image(1)), PairRecord("a 2", image(2), image(3))]
    )
    config = load_config(overrides=["model.tiny=sd15", "data.resolution=8"])
    kw = dict(model=config.model, data=config.data, cache_dir=tmp_path / "cache", log=lambda *_: None)
    before = load_pairs([str(tmp_path / "pairs.jsonl")], stack, **kw)
    fixed = next((tmp_path / "images").glob("*.png"))
    image(99).save(fixed)
    after = load_pairs([str(tmp_path / "pairs.jsonl")], stack, **kw)
    assert len(list((tmp_path / "cache").glob("pairs-*.safetensors"))) == 2
    assert not torch.equal(before.win, after.win) or not torch.equal(before.lose, after.lose)


def test_an_empty_pairs_file_is_named(tmp_path):
    from sail_fast.data.sources import load_pairs
    from sail_fast.diffusion.tiny import tiny_stack

    (tmp_path / "empty.jsonl").write_text("\n")
    config = load_config(overrides=["model.tiny=sd15"])
    with pytest.raises(ValueError, match=r"empty.jsonl holds no usable pairs"):
        load_pairs(
            [str(tmp_path / "empty.jsonl")],
            tiny_stack("sd15", sample_size=8),
            model=config.model,
            data=config.data,
            cache_dir=tmp_path,
            log=lambda *_: None,
        )


# ------------------------------------------------------------------------------- 5. the lock
def test_a_second_run_on_a_locked_folder_is_refused_with_the_holder(tmp_path):
    config, stack = _tiny(tmp_path)
    planted_pairs(stack, 16, 0).save(tmp_path / "pairs.safetensors")
    args = [
        "train",
        "--config",
        str(TINY),
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--set",
        f"data.seed_pairs=[{tmp_path / 'pairs.safetensors'}]",
        "--set",
        "train.checkpoint_every=1000",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "sail_fast.commands.cli", *args, "--set", "train.steps=100000"],
        env=os.environ | {"PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):  # the first run is working once its metrics appear
            if (tmp_path / "run" / "metrics.jsonl").exists():
                break
            time.sleep(0.2)
        holder = json.loads((tmp_path / "run" / LOCK).read_text())
        assert holder["pid"] == first.pid
        second = load_config(TINY, [*args[4::2], "train.steps=2"])
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {first.pid} on "):
            run_training(second)
        with pytest.raises(SystemExit):  # on the command line: one line, exit 2
            main(args)
    finally:
        first.kill()
        first.wait()
    assert (tmp_path / "run" / LOCK).exists()  # killed: the lock is left behind, stale
    run_training(second, resume=True, allow_config_change=True)  # taken over
    assert (tmp_path / "run/final/unet").is_dir() and not (tmp_path / "run" / LOCK).exists()


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    with pytest.raises(KeyError):
        with RunLock(tmp_path):
            assert (tmp_path / LOCK).exists()
            raise KeyError("boom")
    assert not (tmp_path / LOCK).exists()
    RunLock(tmp_path).acquire().release()  # free again


# -------------------------------------------------- 6. a truncated checkpoint and duplicate log rows
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    common = ["train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=4"]
    config, stack = _tiny(tmp_path / "a", *common)
    pairs = planted_pairs(stack, 32, 0)
    trainer_for(config, stack.unet, stack.scheduler, pairs).train()
    expected = load_file(tmp_path / "a/run/final/unet/diffusion_pytorch_model.safetensors")

    config, stack = _tiny(tmp_path / "b", *common)
    trainer_for(config, stack.unet, stack.scheduler, pairs).train(stop_after=3)
    weights = tmp_path / "b/run/checkpoints/step-000003/unet/diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    config, stack = _tiny(tmp_path / "b", *common)
    trainer_for(config, stack.unet, stack.scheduler, pairs).train(resume=True)
    log = (tmp_path / "b/run/train.log").read_text()
    assert "skipping checkpoint" in log and "step-000003" in log and "truncated" in log
    assert "resumed from" in log and "step-000002 at step 2" in log
    got = load_file(tmp_path / "b/run/final/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3, trained twice, is logged once


# -------------------------------------------------------------- 7. every README command parses
def _documentation_pages() -> list[Path]:
    # The README and the pages it links to under docs/: every command and link in them is checked.
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _readme_commands() -> list[list[str]]:
    commands = []
    for page in _documentation_pages():
        commands += _page_commands(page.read_text())
    return commands


def _page_commands(text: str) -> list[list[str]]:
    import shlex

    commands, joined = [], ""
    for block in text.split("```")[1::2]:
        for line in block.splitlines():
            line = joined + line.strip()
            joined = ""
            if line.endswith("\\"):
                joined = line[:-1] + " "
                continue
            if "sail-fast " not in line and "sail_fast/train.py" not in line:
                continue
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value prefixes
                if words[:1] == ["sail-fast"] or "sail_fast/train.py" in words:
                    commands.append(words)
    # Commands quoted inline in the prose (those with a "..." placeholder stand for a family).
    for inline in re.findall(r"`(sail-fast [^`]*)`", text):
        if "..." not in inline:
            commands.append(shlex.split(inline))
    return commands


def test_every_sail_fast_command_in_the_readme_parses(capsys):
    from sail_fast.commands.cli import build_parser
    from sail_fast.commands.train import parse_args

    commands = _readme_commands()
    assert len([c for c in commands if c[0] == "sail-fast"]) >= 10
    assert any(c[:2] == ["sail-fast", "train"] for c in commands)
    for words in commands:
        if words[0] == "sail-fast" and not any(w.startswith("-") for w in words):
            # A command named in the prose (`sail-fast eval`): it must exist and answer --help.
            with pytest.raises(SystemExit) as code:
                build_parser().parse_args([*words[1:], "--help"])
            assert code.value.code == 0, words
        elif words[0] == "sail-fast":
            build_parser().parse_args([w for w in words[1:] if w != "--debug"])
        else:  # python or deepspeed [launcher flags] sail_fast/train.py ...
            parse_args(words[words.index("sail_fast/train.py") + 1 :])


def test_the_readme_is_short_and_every_relative_link_in_it_and_docs_resolves():
    readme_lines = len((REPO / "README.md").read_text().splitlines())
    assert readme_lines <= 320, f"README.md has {readme_lines} lines; move detail into a docs/ page"
    broken, linked = [], set()
    for page in _documentation_pages():
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)
        if len(targets) != prose.count("]("):
            broken.append(f"{page.relative_to(REPO)}: a link that does not close on its line")
        for target in targets:
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a web address or an anchor in the same page
            resolved = (page.parent / target.split("#")[0]).resolve()
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            if page.name == "README.md":
                linked.add(resolved)
    assert not broken, broken
    unlinked = [p.name for p in _documentation_pages()[1:] if p.resolve() not in linked]
    assert len(_documentation_pages()) > 1 and not unlinked, f"docs pages the README does not link: {unlinked}"


# ------------------------------------------------------------------ clear errors, early
@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.beta=0", "train.beta = 0: Input should be greater than 0"),
        ("train.steps=0", "train.steps = 0: Input should be greater than or equal to 1"),
        ("train.checkpoint_every=0", "train.checkpoint_every = 0: Input should be greater than or equal to 1"),
        ("train.log_every=0", "train.log_every = 0: Input should be greater than or equal to 1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints = 0: Input should be greater than or equal to 1"),
    ],
)
def test_out_of_range_values_name_the_key_value_and_range(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_config_errors_are_one_clean_line_and_debug_shows_the_trace(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  tiny: sd15\ntrain: [oops\n")
    with pytest.raises(SystemExit) as code:
        main(["train", "--config", str(bad)])
    err = capsys.readouterr().err
    assert code.value.code == 2 and f"{bad}: line" in err and "not valid YAML" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["run", "--config", str(TINY), "--set", "train.stepz=3"])
    err = capsys.readouterr().err
    assert "config key 'train.stepz' does not exist; did you mean 'train.steps'?" in err
    assert len(err.strip().splitlines()) == 2  # the error and the --debug hint
    with pytest.raises(ConfigError):
        main(["run", "--config", str(TINY), "--set", "train.stepz=3", "--debug"])


def test_too_few_prompts_is_found_before_any_stage(tmp_path):
    config = make_config(tmp_path, "sail.rounds=6")
    with pytest.raises(ValueError, match="need 24 distinct prompts"):
        SailLoop(config).run()
    assert not (tmp_path / "run" / "base").exists()


def test_a_full_disk_says_where(tmp_path, capsys, monkeypatch):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x.safetensors"))

    monkeypatch.setattr("sail_fast.commands.cli._run", full)
    with pytest.raises(SystemExit):
        main(["run"])
    assert f"no space left on {tmp_path / 'run' / 'x.safetensors'}" in capsys.readouterr().err


# -------------------------------------------------------------------------- readable pictures
def test_grid_captions_are_wrapped_under_each_picture():
    images = [Image.new("RGB", (64, 64), "gray")] * 2
    plain = image_grid(images, columns=2)
    captioned = image_grid(images, columns=2, captions=["a handwritten 7 with bold strokes (round-02)", "x"])
    assert plain.size == (128, 64)
    assert captioned.width == 128 and captioned.height >= 64 + 3 * 11  # three wrapped lines of >= 10 px text
    below = np.asarray(captioned.convert("L"))[64:, :64]
    assert (below < 100).any()  # text was drawn under the first picture


def test_lock_file_names_host_and_pid(tmp_path):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(RunLockedError, match="already in use by this process"):
            RunLock(tmp_path).acquire()
