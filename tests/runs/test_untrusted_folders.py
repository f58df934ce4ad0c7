"""A folder from someone else is untrusted input: reading it never runs code (no unpickling, no code named in a
recorded config without --trust-code), and no marker or ledger in it is enough to delete or replace a user's file."""

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sail_fast.commands.cli import main
from sail_fast.dpo.checkpoints import check_deepspeed_files
from sail_fast.runs.output_folder import LEDGER, OutputFolder
from sail_fast.runs.run_folder import (
    FolderInUseError,
    RunLock,
    RunLockedError,
    UntrustedCodeError,
    load_recorded_config,
    write_manifest,
)
from sail_fast.runs.state_files import StateFileError, load_state, save_state
from sail_fast.runs.yaml_files import dump_yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import TINY, planted_pairs  # noqa: E402
from test_weights_folders_and_signals import _sampling_command, _tiny, one_error_line  # noqa: E402

from sail_fast.dpo.builder import trainer_for  # noqa: E402
from sail_fast.runs.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this makes a folder: proof that a file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 2
    return one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------- no unpickling
def test_training_state_round_trips_through_json_and_safetensors(tmp_path):
    shared = torch.arange(6.0)
    state = {
        "step": 7,
        3: {"exp_avg": torch.randn(2, 3), "flag": None},
        "betas": (0.9, 0.999),
        "lr": [1e-3, float("inf")],
        "bf16": torch.ones(4, dtype=torch.bfloat16),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "views": [shared, shared[2:]],
        "tensor": "a key that looks like a tag",
        "nan": float("nan"),
    }
    save_state(state, tmp_path, "state")
    back = load_state(tmp_path, "state")
    assert back["step"] == 7 and back["betas"] == (0.9, 0.999) and back[3]["flag"] is None and 3 in back
    assert back["lr"][1] == float("inf") and back["nan"] != back["nan"] and back["tensor"] == state["tensor"]
    for key in ("bf16", "bytes"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])
    assert torch.equal(back[3]["exp_avg"], state[3]["exp_avg"]) and torch.equal(back["views"][1], shared[2:])
    assert not list(tmp_path.glob("*.pt"))
    (tmp_path / "state.json").write_text(json.dumps({"w": {"tensor": "99"}}))
    with pytest.raises(StateFileError, match="refers to tensor '99'"):
        load_state(tmp_path, "state")
    (tmp_path / "state.json").write_text('{"step": 1')
    with pytest.raises(StateFileError, match="state.json is not readable JSON"):
        load_state(tmp_path, "state")


def test_resume_never_unpickles_a_planted_trainer_state(tmp_path):
    config, stack = _tiny(
        tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.pairs_per_step=8", "train.micro_batch_pairs=4"
    )
    pairs = planted_pairs(stack, 16, 0)
    trainer_for(config, stack.unet, stack.scheduler, pairs).train(stop_after=2)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (checkpoint / "trainer_state.json").is_file() and not list(checkpoint.rglob("*.pt"))  # nothing pickled
    # Someone else's checkpoint: an older-format trainer_state.pt holding a pickle payload, and a matching manifest.
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (checkpoint / name).unlink()
    marker = tmp_path / "code-ran"
    torch.save({"step": 2, "sampler": Payload(marker)}, checkpoint / "trainer_state.pt")
    write_manifest(checkpoint)
    config, stack = _tiny(
        tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.pairs_per_step=8", "train.micro_batch_pairs=4"
    )
    with pytest.raises(StateFileError, match="trainer_state.pt: it is not a plain tensor file"):
        trainer_for(config, stack.unet, stack.scheduler, pairs).train(resume=True)
    assert not marker.exists()


def test_deepspeed_files_that_name_code_are_refused_before_deepspeed_reads_them(tmp_path):
    folder = tmp_path / "deepspeed" / "state"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.18"}, folder / "mp_rank_00_model_states.pt")
    check_deepspeed_files(tmp_path / "deepspeed")  # plain tensors and strings pass
    marker = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": Payload(marker)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(StateFileError, match="optim_states.pt: it is not a plain tensor file"):
        check_deepspeed_files(tmp_path / "deepspeed")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what a full unpickler would have done instead
        torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)


# -------------------------------------------------------- no code from a recorded config
def _run_naming_code(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    taste = tmp_path / "taste.py"
    taste.write_text(
        f"import os\nos.mkdir({str(marker)!r})\n\ndef preference(intensity, digits):\n    return intensity.mean((1, 2, 3))\n"
    )
    run = tmp_path / "experiment" / "seed-0" / "sail"  # as `toy experiment` lays out its runs
    run.mkdir(parents=True)
    config = load_config(
        REPO / "configs" / "toy-quick.yaml", [f"output_dir={run}", f"toy.preference={taste}:preference"]
    )
    (run / "config.yaml").write_text(dump_yaml(config.model_dump(mode="json")))
    return run, marker


def test_reading_a_run_folder_never_runs_the_code_its_config_names(tmp_path, capsys):
    run, marker = _run_naming_code(tmp_path)
    with pytest.raises(UntrustedCodeError, match="toy.preference: .*taste.py:preference"):
        load_recorded_config(run, code="refuse")
    assert load_recorded_config(run, code="drop").toy.preference is None  # generate and export read no code
    line = _refused(["toy", "reward-audit", str(run), "--out", str(tmp_path / "audit.md")], capsys)
    assert "names code to run" in line and "--trust-code" in line
    line = _refused(["toy", "transfer", str(tmp_path / "experiment"), "--seeds", "0", "--conditions", "sail"], capsys)
    assert "names code to run" in line
    # `toy consistency` builds the run's base with its code dropped; samples for the wrong prompts are refused.
    (run / "base").mkdir()
    (run / "base/eval.json").write_text(json.dumps({"prompt_consistency": 0.1}))
    save_file({"latents": torch.zeros(1, 2, 4, 16, 16)}, run / "base/eval_samples.safetensors")
    assert "holds 1 prompts' samples" in _refused(["toy", "consistency", str(run)], capsys)
    assert not (run / "base/prompt_consistency.json").exists()
    assert not marker.exists()
    assert load_recorded_config(run, code="trust").toy.preference.endswith("taste.py:preference")


# ------------------------------------------------ markers never delete or replace a file
def _users_folder(path: Path) -> dict[str, str]:
    path.mkdir(parents=True, exist_ok=True)
    files = {"notes.txt": "my notes", "prompts.json": '["my prompts"]'}
    for name, text in files.items():
        (path / name).write_text(text)
    return files


def _intact(path: Path, files: dict[str, str]) -> bool:
    return all((path / name).read_text() == text for name, text in files.items())


def test_a_crafted_ledger_or_old_marker_never_lets_generate_replace_a_file(tmp_path, capsys):
    out = tmp_path / "out"
    files = _users_folder(out)
    (out / ".sail-fast-out.json").write_text(
        json.dumps({"command": "generate", "files": ["prompts.json", "notes.txt"]})
    )
    (out / LEDGER).write_text(
        json.dumps({"command": "generate"})
        + "\n"
        + "".join(json.dumps({"file": n, "sha256": "0" * 64}) + "\n" for n in files)
    )
    line = _refused(_sampling_command("generate", tmp_path, out), capsys)
    assert "did not write (.sail-fast-out.json, notes.txt, prompts.json)" in line
    assert _intact(out, files)


def test_a_crafted_marker_never_deletes_a_data_dir(tmp_path, capsys):
    from sail_fast.toy.world import write_real_digits

    data = tmp_path / "my-data"
    files = _users_folder(data)
    (data / ".sail-fast-writing").write_text("crafted")  # the marker that once meant 'ours: delete and start again'
    line = _refused(
        [
            "run",
            "--config",
            str(REPO / "configs" / "toy-quick.yaml"),
            "--set",
            f"output_dir={tmp_path / 'run'}",
            "--set",
            f"toy.data_dir={data}",
        ],
        capsys,
    )
    assert f"toy.data_dir {data} holds files" in line and _intact(data, files)
    with pytest.raises(FolderInUseError, match="the real-digits folder"):
        write_real_digits(data, 10, seed=0)
    assert _intact(data, files) and (data / ".sail-fast-writing").read_text() == "crafted"


def test_a_run_never_replaces_a_users_config_or_summary(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my: config\n")
    (out / "summary.md").write_text("# my summary\n")
    for extra in ([], ["--resume"]):
        line = _refused(["train", "--config", str(TINY), "--set", f"output_dir={out}", *extra], capsys)
        assert "is not a sail-fast run this command can continue" in line and "no run.json" in line
    (out / "config.yaml").unlink()
    line = _refused(["train", "--config", str(TINY), "--set", f"output_dir={out}"], capsys)
    assert "holds summary.md, which no sail-fast run recorded there" in line
    assert (out / "summary.md").read_text() == "# my summary\n" and sorted(p.name for p in out.iterdir()) == [
        "summary.md"
    ]


def test_eval_never_writes_through_a_symbolic_link(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    files = _users_folder(elsewhere)
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores").symlink_to(elsewhere, target_is_directory=True)
    line = _refused(_sampling_command("eval", tmp_path, out), capsys)
    assert "scores (a symbolic link)" in line
    assert _intact(elsewhere, files) and sorted(p.name for p in elsewhere.iterdir()) == sorted(files)


def test_toy_pretrain_refuses_a_users_folder_before_training(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model_index.json").write_text('{"mine": true}')
    line = _refused(["toy", "pretrain", "--out", str(out), "--steps", "1"], capsys)
    assert "holds files `sail-fast toy pretrain` did not write (model_index.json)" in line
    assert (out / "model_index.json").read_text() == '{"mine": true}'


def test_one_command_per_folder_and_never_a_mixed_folder(tmp_path):
    first = OutputFolder(tmp_path / "out", "generate")
    with pytest.raises(FolderInUseError, match="being written by another sail-fast command"):
        OutputFolder(tmp_path / "out", "generate")
    first.write_text("prompts.json", "[]")
    del first  # the process that held it is done: the lock goes with it
    again = OutputFolder(tmp_path / "out", "generate")
    assert again.files.keys() == {"prompts.json"}
    del again
    with pytest.raises(FolderInUseError, match="of `sail-fast generate`"):
        OutputFolder(tmp_path / "out", "eval")


def test_an_interrupted_write_leaves_no_file_and_a_changed_file_is_the_users(tmp_path):
    folder = OutputFolder(tmp_path / "out", "generate")
    with pytest.raises(KeyboardInterrupt):
        with folder.write("grid.png") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in folder.path.iterdir()) == [".sail-fast-written.jsonl", ".sail-fast-written.lock"]
    folder.write_text("prompts.json", "[1]")
    (folder.path / ".sail-fast-partial-abc-grid.png").write_bytes(b"left by a SIGKILL")  # ignored, never deleted
    del folder
    assert OutputFolder(tmp_path / "out", "generate").files.keys() == {"prompts.json"}
    (tmp_path / "out" / "prompts.json").write_text("[2] edited by the user")
    with pytest.raises(FolderInUseError, match=r"did not write \(prompts.json\)"):
        OutputFolder(tmp_path / "out", "generate")
    assert (tmp_path / "out" / ".sail-fast-partial-abc-grid.png").read_bytes() == b"left by a SIGKILL"


def test_an_unreadable_lock_is_not_taken_over(tmp_path):
    (tmp_path / "run.lock").write_text("not json")
    with pytest.raises(RunLockedError, match="not a lock sail-fast wrote"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / "run.lock").read_text() == "not json"
    (tmp_path / "run.lock").unlink()
    with RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert not list(tmp_path.iterdir())


def test_label_never_replaces_a_picture_of_the_same_name(tmp_path, capsys):
    from test_messages import one_pair_parquet

    one_pair_parquet(tmp_path / "pairs.parquet")
    out = tmp_path / "labelled" / "pairs.jsonl"
    mine = out.parent / "images" / "pairs-000000-win.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my picture")
    line = _refused(
        ["label", str(tmp_path / "pairs.parquet"), "--metric", "toy_oracle", "--range", "0", "1", "--out", str(out)],
        capsys,
    )
    assert f"{mine} already exists" in line and "never replaces" in line
    assert mine.read_bytes() == b"my picture" and sorted(p.name for p in mine.parent.iterdir()) == [mine.name]
    assert not out.exists()


def test_a_read_only_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import errno

    from test_messages import one_pair_parquet

    import sail_fast.commands.label
    import sail_fast.toy.pretrain

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    def no_work(*a, **k):
        raise AssertionError("the work ran before the output folder was checked")

    monkeypatch.setattr(sail_fast.commands.label, "relabel", no_work)
    monkeypatch.setattr(sail_fast.toy.pretrain, "load_digits", no_work)
    monkeypatch.setattr(Path, "mkdir", read_only)
    one_pair_parquet(tmp_path / "pairs.parquet")
    line = _refused(
        [
            "label",
            str(tmp_path / "pairs.parquet"),
            "--metric",
            "toy_oracle",
            "--range",
            "0",
            "1",
            "--out",
            str(tmp_path / "ro" / "pairs.jsonl"),
        ],
        capsys,
    )
    assert f"--out {tmp_path / 'ro'} cannot be written (Read-only file system" in line
    line = _refused(["toy", "pretrain", "--out", str(tmp_path / "ro"), "--steps", "1"], capsys)
    assert f"--out {tmp_path / 'ro'} cannot be written (Read-only file system" in line
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("x")
    line = _refused(["toy", "pretrain", "--out", str(tmp_path / "a-file"), "--steps", "1"], capsys)
    assert "is a file" in line and (tmp_path / "a-file").read_text() == "x"
