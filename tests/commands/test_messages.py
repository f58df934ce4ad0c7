"""Nothing silently wrong: no third-party noise, and messages that fit the command (issue 35). A model load
prints no library bar, Ctrl-C during start-up is one line, hints name the command's own flags, a stage
marked done without its weights is named, a toy.preference's failure is the user's code, and a resumed
run names a change of versions."""

import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sail_fast.commands.arguments import full_disk_hint, stop_hint, user_errors
from sail_fast.commands.cli import main
from sail_fast.runs.callables import UserCodeError
from sail_fast.runs.versions import describe_version_change, version_record
from sail_fast.toy.human import ToyOracle

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import make_overrides  # noqa: E402
from test_train import TINY  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOY_MODEL = REPO / "sail_fast" / "toy_model"
ENV = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _generate_argv(tmp_path) -> list[str]:
    """`sail-fast generate` on the shipped toy model, one picture at one step: a real model load in seconds."""
    (tmp_path / "prompts.txt").write_text("a handwritten 7\n")
    return [
        "generate",
        "--checkpoint",
        str(TOY_MODEL),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--num-images",
        "1",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------- 1. no third-party noise
@pytest.mark.slow
def test_a_command_that_loads_models_prints_only_its_own_lines(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sail_fast.commands.cli", *_generate_argv(tmp_path)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # tqdm redraws a bar with \r: every piece of output is the command's own bar ("generate: ...") or line.
    pieces = [p.strip() for p in re.split(r"[\r\n]", done.stdout + done.stderr) if p.strip()]
    foreign = [p for p in pieces if not p.startswith(("generate:", "wrote 1 images"))]
    assert not foreign, foreign  # transformers' "Loading weights: 100%|..." among them before
    assert any(p.startswith("generate:") for p in pieces)  # the run's own bar stays


# ------------------------------------------------------------------ 2. Ctrl-C during start-up
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    # -X importtime prints each import as it ends: the first torch module printed means the heavy imports are
    # under way (seconds of them), so the signal lands there and not in the interpreter's own start.
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "sail_fast.commands.cli", *_generate_argv(tmp_path)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in process.stderr:
            if re.search(r"\|\s+torch\b", line):
                process.send_signal(signal.SIGINT)
                break
        err = process.stderr.read()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    ours = "\n".join(line for line in err.splitlines() if not line.startswith("import time:"))
    assert process.returncode == 128 + signal.SIGINT, ours
    assert _error_line(ours) == "sail-fast: interrupted (Ctrl-C)"


# ---------------------------------------------------------------- 3. hints in the command's flags
@pytest.mark.parametrize(
    "command, hint",
    [
        ("run", "free space or choose another output_dir, then rerun with --resume"),
        ("train", "free space or choose another output_dir, then rerun with --resume"),
        ("generate", "free space or choose another --out, then run it again"),
        ("eval", "free space or choose another --out, then run it again"),
        ("label", "free space or choose another --out, then run it again"),
        ("export", "free space or choose another out folder, then run it again"),
    ],
)
def test_the_full_disk_hint_names_the_commands_own_flags(command, hint):
    assert full_disk_hint(command) == hint


def test_the_stop_hint_resumes_a_training_command_and_reruns_the_others():
    assert stop_hint(["sail-fast", "run", "--config", "c.yaml"]) == "to go on: sail-fast run --config c.yaml --resume"
    assert stop_hint(None) == "to go on: run it again"


def test_ctrl_c_in_generate_says_run_it_again(capsys):
    with pytest.raises(SystemExit) as code, user_errors("sail-fast", command="generate"):
        raise KeyboardInterrupt
    assert code.value.code == 130
    assert _error_line(capsys.readouterr().err) == "sail-fast: interrupted (Ctrl-C); to go on: run it again"


def test_a_full_disk_during_generate_names_its_out_flag(tmp_path, capsys, monkeypatch):
    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a file object's write() says it

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(SystemExit) as code:
        main(_generate_argv(tmp_path))
    assert code.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # bars share stderr
    assert lines == [
        "sail-fast: error: no space left on the device: free space or choose another --out, then run it again"
    ]


def one_pair_parquet(path: Path) -> Path:
    """A Pick-a-Pic-shaped parquet file with one pair of 16x16 PNGs (black against white)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("L", (16, 16), value).save(buffer, format="PNG")
        return buffer.getvalue()

    pq.write_table(
        pa.table({"caption": ["a handwritten 1"], "jpg_0": [png(0)], "jpg_1": [png(255)], "label_0": [1.0]}), path
    )
    return path


def test_a_full_disk_while_label_writes_pictures_leaves_none_half_written(tmp_path, capsys, monkeypatch):
    one_pair_parquet(tmp_path / "pairs.parquet")

    def full(self, fp, *args, **kwargs):  # a disk that fills half-way through a picture
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "labelled" / "pairs.jsonl"
    with pytest.raises(SystemExit) as code:
        main(
            ["label", str(tmp_path / "pairs.parquet"), "--metric", "toy_oracle", "--range", "0", "1", "--out", str(out)]
        )
    assert code.value.code == 2
    picture = out.parent / "images" / "pairs-000000-win.png"
    line = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line == [
        f"sail-fast: error: no space left on {picture}: free space or choose another --out, then run it again"
    ]
    assert list((out.parent / "images").iterdir()) == [] and not out.exists()


# ------------------------------------------------------- 4. a stage marked done without its final/
@pytest.mark.slow
def test_a_done_stage_without_its_final_folder_is_named_with_the_fix(tmp_path, capsys):
    overrides = make_overrides(tmp_path, "sail.rounds=0", "sail.iter0_steps=0")
    main(["train", "--config", str(TINY), *[a for kv in overrides for a in ("--set", kv)]])
    run = tmp_path / "run"
    shutil.rmtree(run / "iter0" / "final")
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main(["train", "--config", str(TINY), *[a for kv in overrides for a in ("--set", kv)], "--resume"])
    assert code.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert lines == [
        f"sail-fast: error: {run / 'iter0/final/unet'} is missing, though its stage is marked done "
        f"({run / 'iter0/done.json'}); to train that stage again, delete {run / 'iter0'} and every later "
        "stage's folder, then rerun with --resume"
    ]


# ------------------------------------------------------------------- 5. the user's own preference code
@pytest.mark.parametrize(
    "code, error",
    [
        ("def taste(images, digits)\n    return images.mean()\n", "SyntaxError"),
        ("import a_module_nobody_installed\n", "ModuleNotFoundError: No module named 'a_module_nobody_installed'"),
        ("raise RuntimeError('no taste yet')\n", "RuntimeError: no taste yet"),
    ],
)
def test_a_preference_that_fails_to_load_is_named_with_its_own_traceback(tmp_path, capsys, code, error):
    taste = tmp_path / "taste.py"
    taste.write_text(code)
    with pytest.raises(SystemExit) as exit_code, user_errors("sail-fast"):
        ToyOracle.load(preference=f"{taste}:taste")
    assert exit_code.value.code == 2
    *traceback, line = capsys.readouterr().err.splitlines()
    assert f'File "{taste}", line 1' in "\n".join(traceback)  # the user's code, where it failed
    assert not [frame for frame in traceback if "sail_fast" in frame]  # and none of sail-fast's frames
    assert line.startswith(f"sail-fast: error: toy.preference: {taste} failed to load: {error}")


def test_a_preference_that_raises_is_named_with_its_own_traceback(tmp_path, capsys):
    taste = tmp_path / "taste.py"
    taste.write_text("def taste(images, digits):\n    return images.mean(dim=(1, 2)) * {'bold': 1.0}['faint']\n")
    oracle = ToyOracle.load(preference=f"{taste}:taste")
    with pytest.raises(SystemExit) as exit_code, user_errors("sail-fast"):
        oracle.score(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2]))
    assert exit_code.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1] == f'  File "{taste}", line 2, in taste'  # the user's frame, not sail-fast's
    assert lines[-1] == (
        f"sail-fast: error: toy.preference: {taste}:taste failed: KeyError: 'faint' (that code's traceback is above)"
    )


def test_a_preference_error_is_a_user_code_error_in_library_use(tmp_path):
    oracle = ToyOracle.load(preference=lambda images, digits: 1 / 0)
    with pytest.raises(UserCodeError, match="toy.preference: .*test_messages.py:<lambda> failed: ZeroDivisionError"):
        oracle.score(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2]))


# -------------------------------------------------------------------------------- 6. versions
def test_a_version_record_holds_sail_fast_torch_diffusers_and_the_kernels():
    import diffusers

    import sail_fast

    record = version_record()
    assert record == {
        "sail_fast": sail_fast.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 and AVX-512 kernels round differently
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    assert describe_version_change(record, record) is None


def test_a_changed_version_is_named_in_one_line():
    now = {"sail_fast": "0.2.0", "torch": "2.13.0", "diffusers": "0.42.1"}
    before = {"sail_fast": "0.1.0", "torch": "2.12.0", "diffusers": "0.42.1", "config_sha256": "ab12"}
    assert describe_version_change(before, now) == (
        "resuming with other versions than the run began with: sail-fast 0.1.0 -> 0.2.0, torch 2.12.0 -> 2.13.0; "
        "its finished stages were made by the earlier ones (later stages will differ from an unbroken run, to "
        "rounding at first)"
    )
    machine = describe_version_change(now | {"cpu_capability": "AVX2"}, now | {"cpu_capability": "AVX512"})
    assert "torch CPU kernels AVX2 -> AVX512" in machine
    assert describe_version_change({"config_sha256": "ab12"}, now) is None  # a record from before versions
