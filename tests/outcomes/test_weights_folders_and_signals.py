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

from sail_fast.commands.cli import main
from sail_fast.diffusion.build import build_stack
from sail_fast.dpo.builder import trainer_for
from sail_fast.dpo.trainer import DPOTrainer
from sail_fast.runs.config import load_config
from sail_fast.runs.run_folder import LOCK, WeightsChangedError
from sail_fast.sail.loop import SailLoop

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_config  # noqa: E402
from test_train import TINY, planted_pairs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
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
    lines = [line for line in err.splitlines() if "error:" in line]  # progress bars may share stderr
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------ 1. content-hashed weights
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A SAIL run with iter0 only, on the tiny stack (seconds). It keeps iter0 (select: last), so the commands
    given the run folder read iter0's weights whatever the tiny stack's round score says."""
    tmp_path = tmp_path_factory.mktemp("finished")
    SailLoop(make_config(tmp_path, "sail.rounds=0", "sail.select=last")).run()
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
        SailLoop(make_config(finished_run, "sail.rounds=0", "sail.select=last", f"output_dir={run}")).run(resume=True)
    assert not (run / LOCK).exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    commands = [
        ["generate", "--checkpoint", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "g")],
        ["export", str(run / "iter0/final/unet"), str(tmp_path / "x")],
        [
            "eval",
            "--checkpoint",
            str(run),
            "--prompts",
            str(prompts),
            "--metrics",
            "toy_oracle",
            "--out",
            str(tmp_path / "e"),
        ],
    ]
    for argv in commands:
        with pytest.raises(SystemExit) as code:
            main(argv)
        assert code.value.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{weights} does not match the sha256" in line, argv
    assert not list(tmp_path.glob("g/*.png")) and not list(tmp_path.glob("x/*.safetensors"))


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
    common = [
        "train.steps=3",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=3",
        "train.pairs_per_step=4",
        "train.micro_batch_pairs=4",
    ]
    config, stack = _tiny(tmp_path, *common)
    pairs = planted_pairs(stack, 8, 0)
    trainer_for(config, stack.unet, stack.scheduler, pairs).train(stop_after=2)
    zero_tensor_bytes(tmp_path / "run/checkpoints/step-000002" / WEIGHTS)
    config, stack = _tiny(tmp_path, *common)
    trainer_for(config, stack.unet, stack.scheduler, pairs).train(resume=True)
    log = (tmp_path / "run/train.log").read_text()
    assert "skipping checkpoint" in log and "does not match the sha256" in log
    assert "step-000001 at step 1" in log
    final = load_file(tmp_path / "run/final" / WEIGHTS)
    assert all(torch.isfinite(t).all() for t in final.values()) and any(t.abs().sum() > 0 for t in final.values())


# ------------------------------------------------ 2. commands never replace a user's files
TOY_PIPELINE = REPO / "sail_fast" / "toy_model"


def _sampling_command(command, tmp_path, out):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 3\n")
    common = [
        "--checkpoint",
        str(TOY_PIPELINE),
        "--prompts",
        str(prompts),
        "--steps",
        "2",
        "--sampler",
        "ddim",
        "--out",
        str(out),
    ]
    return [command, *common, *(["--num-images", "1"] if command == "generate" else ["--metrics", "toy_oracle"])]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_generate_and_eval_never_replace_a_file_they_did_not_write(tmp_path, capsys, command):
    out = tmp_path / "out"
    main(_sampling_command(command, tmp_path, out))
    written = sorted(p.name for p in out.iterdir())
    main(_sampling_command(command, tmp_path, out))  # its own folder: written again
    assert sorted(p.name for p in out.iterdir()) == written
    capsys.readouterr()
    for name in ["prompts.json", "grid.png", "0000-00.png", "eval.json", "eval.md"]:
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_text("my work")
        with pytest.raises(SystemExit) as code:
            main(_sampling_command(command, tmp_path, mine))
        assert code.value.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"holds files `sail-fast {command}` did not write ({name})" in line
        assert (mine / name).read_text() == "my work" and len(list(mine.iterdir())) == 1
    (out / "notes.txt").write_text("mine")  # a file added to the command's own folder is protected too
    with pytest.raises(SystemExit):
        main(_sampling_command(command, tmp_path, out))
    assert "(notes.txt)" in capsys.readouterr().err


def test_export_refuses_another_commands_folder(tmp_path, finished_run, capsys):
    out = tmp_path / "g"
    main(_sampling_command("generate", tmp_path, out))
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main(["export", str(finished_run / "run"), str(out)])
    assert code.value.code == 2 and "`sail-fast export` did not write" in one_error_line(capsys.readouterr().err)
    main(["export", str(finished_run / "run"), str(tmp_path / "x")])
    main(["export", str(finished_run / "run"), str(tmp_path / "x")])  # its own export, written again
    assert (tmp_path / "x" / "diffusion_pytorch_model.safetensors").is_file()


# ----------------------------------------------------------- 3. path mistakes: one line, exit 2
def _train_into(output_dir, capsys, *extra):
    with pytest.raises(SystemExit) as code:
        main(["train", "--config", str(TINY), "--set", f"output_dir={output_dir}", *extra])
    assert code.value.code == 2
    return one_error_line(capsys.readouterr().err)


def test_output_dir_mistakes_end_in_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert f"output_dir {a_file} is a file, not a folder" in _train_into(a_file, capsys)
    assert f"is under {a_file}, which is a file" in _train_into(a_file / "run", capsys)
    line = _train_into("/sys/sail-fast-run", capsys)
    assert "output_dir /sys/sail-fast-run cannot be written (Operation not permitted" in line
    import errno

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert f"output_dir {tmp_path / 'ro'} cannot be written (Read-only file system" in _train_into(
        tmp_path / "ro", capsys
    )


def test_eval_out_naming_a_file_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    with pytest.raises(SystemExit) as code:
        main(_sampling_command("eval", tmp_path, a_file))
    assert code.value.code == 2
    assert f"--out {a_file} is a file" in one_error_line(capsys.readouterr().err)
    assert a_file.read_text() == "{}"


def test_a_full_disk_during_a_checkpoint_names_it_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    config, stack = _tiny(tmp_path)
    planted_pairs(stack, 4, 0).save(tmp_path / "pairs.safetensors")

    def full(self, path, state):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(DPOTrainer, "_save_unet", full)
    line = _train_into(
        tmp_path / "run",
        capsys,
        "--set",
        f"data.seed_pairs=[{tmp_path / 'pairs.safetensors'}]",
        "--set",
        "train.steps=1",
        "--set",
        "train.pairs_per_step=4",
        "--set",
        "train.micro_batch_pairs=4",
    )
    assert f"no space left on {tmp_path / 'run/checkpoints/step-000001'}" in line
    assert not list((tmp_path / "run/checkpoints").glob("step-*")) and not (tmp_path / "run" / LOCK).exists()


def test_a_full_disk_while_labelling_names_the_output(tmp_path, capsys, monkeypatch):
    import errno

    from PIL import Image

    from sail_fast.data.records import PairRecord, write_pairs_jsonl

    digit = Image.new("L", (16, 16))
    write_pairs_jsonl(tmp_path / "pairs.jsonl", [PairRecord("a handwritten 1", digit, digit)])

    def full(path, records):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a file object's write() says it

    monkeypatch.setattr("sail_fast.commands.label.write_pairs_jsonl", full)
    out = tmp_path / "labelled/pairs.jsonl"
    with pytest.raises(SystemExit) as code:
        main(["label", str(tmp_path / "pairs.jsonl"), "--metric", "toy_oracle", "--range", "0", "1", "--out", str(out)])
    assert code.value.code == 2 and f"no space left on {out}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 4. SIGTERM and Ctrl-C
def _start_long_training(tmp_path):
    config, stack = _tiny(tmp_path)
    planted_pairs(stack, 4, 0).save(tmp_path / "pairs.safetensors")
    argv = [
        "train",
        "--config",
        str(TINY),
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--set",
        f"data.seed_pairs=[{tmp_path / 'pairs.safetensors'}]",
        "--set",
        "train.steps=100000",
        "--set",
        "train.checkpoint_every=1000",
        "--set",
        "train.pairs_per_step=4",
        "--set",
        "train.micro_batch_pairs=4",
    ]
    # SIGINT back to its default in the child: a shell script's background job (a CI runner's, say) starts
    # with it ignored, and Python then never raises KeyboardInterrupt, so Ctrl-C could not be tested.
    process = subprocess.Popen(
        [sys.executable, "-m", "sail_fast.commands.cli", *argv],
        env=os.environ | {"PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for _ in range(900):  # training once its first step is logged
        if (tmp_path / "run" / "metrics.jsonl").exists() or process.poll() is not None:
            break
        time.sleep(0.2)
    return process, argv


def _wait(process):
    """The child's output once it exits; one that has not exited in 120 s is killed, not left training."""
    try:
        return process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_during_dpo_writes_a_checkpoint_releases_the_lock_and_says_how_to_resume(tmp_path):
    process, argv = _start_long_training(tmp_path)
    process.send_signal(signal.SIGTERM)
    _, err = _wait(process)
    assert process.returncode == 128 + signal.SIGTERM, err
    line = one_error_line(err.replace("sail-fast: stopped", "sail-fast: error: stopped"))
    assert "stopped by SIGTERM at DPO step" in line and "--resume" in line and argv[-1] in line
    run = tmp_path / "run"
    assert not (run / LOCK).exists()
    checkpoints = list((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and not checkpoints[0].name.endswith(".tmp") and checkpoints[0].name in line


def test_ctrl_c_prints_no_traceback_and_releases_the_lock(tmp_path):
    process, _ = _start_long_training(tmp_path)
    process.send_signal(signal.SIGINT)
    _, err = _wait(process)
    assert process.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "interrupted (Ctrl-C); to go on: sail-fast train" in err
    assert not (tmp_path / "run" / LOCK).exists()


# ---------------------------------------------------------------- 5. plan and generate arguments
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--gpus", "0"], "--gpus must be >= 1 (the GPUs the run trains on), got 0"),
        (["--gpus", "-2"], "--gpus must be >= 1 (the GPUs the run trains on), got -2"),
        (["--gpu-memory", "0"], "--gpu-memory must be > 0 (GB per GPU, e.g. 80), got 0"),
        (["--gpu-memory", "-5"], "--gpu-memory must be > 0 (GB per GPU, e.g. 80), got -5"),
    ],
)
def test_plan_refuses_impossible_gpu_counts_and_memory(flags, expected, capsys):
    with pytest.raises(SystemExit) as code:
        main(["plan", "--config", str(TINY), *flags])
    assert code.value.code == 2 and expected in one_error_line(capsys.readouterr().err)


def test_generate_refuses_zero_steps_before_writing_anything(tmp_path, capsys):
    argv = _sampling_command("generate", tmp_path, tmp_path / "out")
    argv[argv.index("--steps") + 1] = "0"
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 2 and "--steps must be >= 1" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ 6. quieter gaps
def test_a_yaml_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    from sail_fast.runs.config import ConfigError

    config = tmp_path / "dup.yaml"
    config.write_text("model:\n  toy: true\ntrain:\n  steps: 3\n  beta: 100\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'train.steps' is given twice \(line 4 and line 6\)"):
        load_config(config)


def test_duplicate_pair_lines_are_counted_in_a_warning(tmp_path):
    from PIL import Image

    from sail_fast.data.records import PairRecord, read_pairs_jsonl, write_pairs_jsonl

    a, b = Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)
    write_pairs_jsonl(tmp_path / "pairs.jsonl", [PairRecord("a 1", a, b), PairRecord("a 2", b, a)])
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    (tmp_path / "pairs.jsonl").write_text("\n".join([lines[0], lines[1], lines[0], lines[0]]) + "\n")
    records, stats = read_pairs_jsonl(tmp_path / "pairs.jsonl")
    assert len(records) == 4 and stats.duplicates == 2
    assert "WARNING: 2 rows repeat an earlier pair" in str(stats)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("prompts.txt", b"a cat\n\xff\xfe a dog\n", "not UTF-8 text"),
        ("prompts.json", b'["a cat", ', "not valid JSON (line 1, column"),
        ("prompts.tsv", b"Prompt\n\xff\n", "not UTF-8 text"),
    ],
)
def test_an_unreadable_prompt_file_is_named(tmp_path, name, content, expected):
    from sail_fast.diffusion.prompts import read_prompt_set, read_prompts

    path = tmp_path / name
    path.write_bytes(content)
    for read in (read_prompts, read_prompt_set):
        with pytest.raises(ValueError) as err:
            read(path)
        assert str(err.value).startswith(f"{path}: {expected}")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sail.candidates=1", "sail.candidates = 1: Input should be greater than or equal to 2"),
        ("sail.num_draws=0", "sail.num_draws = 0: Input should be greater than or equal to 1"),
        ("sail.sampling_steps=0", "sail.sampling_steps = 0: Input should be greater than or equal to 1"),
    ],
)
def test_sail_limits_name_the_failing_value(override, expected):
    from sail_fast.runs.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/toy-quick.yaml", [override])
    assert expected in str(err.value) and "sail.rounds >= 0" not in str(err.value)


def test_an_unknown_section_lists_the_sections_and_their_keys():
    from sail_fast.runs.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["nosuch.key=1"])
    message = str(err.value)
    assert "config key 'nosuch' does not exist; the top level has: output_dir, seed, model: (path, tiny," in message
    assert "train: (loss, beta," in message and "sail: (rounds," in message
    with pytest.raises(ConfigError, match="config key 'trian' does not exist; did you mean 'train'"):
        load_config(TINY, ["trian.steps=3"])


def test_a_prompt_longer_than_the_text_encoder_reads_is_reported_once(capsys, monkeypatch):
    import sail_fast.diffusion.stack as models

    monkeypatch.setattr(models, "_warned_cut", False)
    stack = build_stack(load_config(REPO / "configs/toy-quick.yaml").model)
    stack.encode_prompts(["a handwritten 3", "x" * 2000])
    stack.encode_prompts(["y" * 2000])
    err = capsys.readouterr().err
    assert err.count("WARNING: 1 prompt(s) are longer than the text encoder's") == 1 and "2000 characters" in err


def test_offline_hub_weights_that_are_not_cached_fail_in_one_line_before_any_work(tmp_path, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as code:
        main(["train", "--config", str(REPO / "configs/sd15.yaml"), "--set", f"output_dir={tmp_path / 'run'}"])
    assert code.value.code == 2 and time.perf_counter() - started < 5
    line = one_error_line(capsys.readouterr().err)
    assert (
        "model.path 'stable-diffusion-v1-5' is not a local folder, and the Hugging Face Hub is in offline mode" in line
    )
    assert "no copy in its cache" in line
    assert not (tmp_path / "run").exists()
